"""The processor side of the Hugging Face LLaVA export (:mod:`asvr.train.export.hf_llava`): the
chat template (Jinja rendering the training prompt), the ``LlavaProcessor`` (image processor +
text tokenizer), and the check that the saved processor's ids are the training ids.  Split
from ``hf_llava.py`` (the weights and the folder) in issue 21: files under 400 lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from asvr.tokenizer.encoders.base import encoder_kind
from asvr.tokenizer.preprocess import preprocess_mode
from asvr.train.export.hf_tower import HFExportError

if TYPE_CHECKING:
    from asvr.train.export.hf_tower import HFTower

IMAGE_TOKEN = "<image>"


_ROLE = "{% set role = 'user' if message['role'] in ('user', 'human') else 'assistant' %}"
_CONTENT = (
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set n_img = 0 %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') %}"
    "{% set n_img = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% endif %}"
)


def _literal(text: str) -> str:
    """Text as a Jinja string literal (safe for any characters)."""
    return "{{ " + json.dumps(text) + " }}"


def chat_template(template, after_image: str = "") -> str:
    """Jinja rendering :func:`asvr.train.data.templates.render` of a template: the prompt string
    ``asvr-eval`` asks with (the image as ``<image>\\n`` at the front of its turn, as
    LLaVA's ``preprocess_multimodal``; ``plain`` keeps only the image of a question).

    ``after_image`` goes right after ``<image>`` (before the ``\\n``; before a ``plain``
    caption): training tokenizes the text after the image on its own, the processor
    tokenizes the whole string, and for a ``legacy=False`` SentencePiece tokenizer one
    space here is the ``▁`` that training has and the processor would drop
    (:mod:`asvr.train.export.hf_prompt` chooses it and checks the ids at export time)."""
    t = template
    head = _ROLE + _CONTENT + "{% set text = text | trim if n_img else text %}"
    image = "{% if n_img %}" + _literal(IMAGE_TOKEN + after_image + "\n") + "{% endif %}"
    if t.style == "plain":
        first, gen = "", ""
        user = "{% if n_img %}" + _literal(IMAGE_TOKEN) + "{% endif %}"
        answer = (_literal(after_image) if after_image else "") + "{{ text }}" + _literal(t.sep)
    elif t.style == "two":
        end = _literal(t.sep2) if t.sep2 is not None else "{{ eos_token }}"
        first = _literal(t.system + t.sep)
        user = _literal(f"{t.roles[0]}: ") + image + "{{ text }}" + _literal(t.sep)
        answer = _literal(f"{t.roles[1]}: ") + "{{ text }}" + end
        gen = _literal(f"{t.roles[1]}:")
    elif t.style == "chatml":
        first = _literal(f"<|im_start|>system\n{t.system}<|im_end|>\n") if t.system else ""
        user = _literal(f"<|im_start|>{t.roles[0]}\n") + image + "{{ text }}" + _literal("<|im_end|>\n")
        answer = _literal(f"<|im_start|>{t.roles[1]}\n") + "{{ text }}" + _literal("<|im_end|>\n")
        gen = _literal(f"<|im_start|>{t.roles[1]}\n")
    else:
        raise HFExportError(f"no chat template for conversation style {t.style!r}")
    return (
        f"{first}{{% for message in messages %}}{head}{{% if role == 'user' %}}{user}{{% else %}}{answer}"
        f"{{% endif %}}{{% endfor %}}{{% if add_generation_prompt %}}{gen}{{% endif %}}"
    )


def processor(tower: HFTower, text_tokenizer, template, after_image: str = ""):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from PIL import Image

    R = Image.Resampling  # plain ints, as the processor config stores them
    resample = {
        "bicubic": int(R.BICUBIC),
        "bilinear": int(R.BILINEAR),
        "lanczos": int(R.LANCZOS),
        "nearest": int(R.NEAREST),
    }[tower.resample]
    size = {"height": tower.image_size, "width": tower.image_size}
    image_processor = LlavaImageProcessorPil(
        size=size,
        crop_size=size,
        do_center_crop=False,
        do_resize=True,
        resample=resample,
        do_pad=preprocess_mode(tower.preprocess).llava_do_pad,
        image_mean=list(tower.mean),
        image_std=list(tower.std),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=text_tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=tower.strategy,
        chat_template=chat_template(template, after_image),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if encoder_kind(tower.kind).drop_cls else 0,
    )


def save_processor(folder: Path, tower: HFTower, text_tok, template, reference, image_tokens: int) -> str:
    """Write the processor into ``folder`` so that its ids are the training ids; -> the chat
    template's text after ``<image>`` (see :mod:`asvr.train.export.hf_prompt`).  Each candidate is
    saved, reloaded from the folder (as transformers / lmms-eval load it) and checked."""
    from transformers import AutoProcessor

    from asvr.train.export.hf_prompt import AFTER_IMAGE, adds_special_tokens, check_processor
    from asvr.train.model.text_tokenizer import write_back_settings

    if not template.add_special_tokens and adds_special_tokens(text_tok):
        # trained without special tokens (chatml): the processor's tokenizer must not add a BOS either
        text_tok.add_bos_token = False
        if getattr(text_tok, "add_eos_token", False):
            text_tok.add_eos_token = False
    reasons = []
    for after in AFTER_IMAGE:
        processor(tower, text_tok, template, after).save_pretrained(folder)
        write_back_settings(text_tok, folder)
        reloaded = AutoProcessor.from_pretrained(folder, local_files_only=True)
        reason = check_processor(reloaded, template, reference, image_tokens, tower.image_size)
        if reason is None:
            return after
        reasons.append(reason)
    raise HFExportError(
        f"the exported processor would not prompt as training did ({reasons[0]}; with a space after "
        f"<image>: {reasons[-1].split(': ', 1)[-1]}); not writing the folder"
    )
