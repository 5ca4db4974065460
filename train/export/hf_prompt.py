"""The exported LLaVA folder prompts with the training ids: chosen and checked at export time.

LLaVA's ``tokenizer_image_token`` (and ``asvr-train``, ``train/data/templates.py``)
tokenizes the text after ``<image>`` on its own, so a SentencePiece tokenizer
puts its dummy-prefix ``▁`` at the start of that chunk: real LLaVA streams
read ``..., 29871, -200, 29871, 13, ...`` (``▁``, image, ``▁``, ``\\n``).
transformers' ``LlavaProcessor`` -- what transformers, lmms-eval's
``llava_hf`` and ``asvr-eval bench`` on the folder run -- renders the chat
template to one string and tokenizes it once.  After the special token
``<image>`` a ``legacy=False`` SentencePiece tokenizer adds no ``▁`` (one
token short), a ``legacy=True`` one does, byte-level BPE never has one.

What the export does about it (:func:`after_image_candidates`,
:func:`check_processor`): it writes the processor with nothing after
``<image>``, reloads it from the folder as every consumer does, and compares
the processor's ids with the training stream on probe conversations (one-
and multi-turn, with and without an image, generation prompts and whole
conversations); when they differ it tries one space after ``<image>`` (which a
``legacy=False`` tokenizer reads as exactly that ``▁``); when neither gives the
training ids the export is refused with the first differing position.
Templates trained without special tokens (``chatml``) get a tokenizer that
adds no BOS, as in training.  Measured on the tiny tokenizers of
``tests/test_hf_prompt_ids_22.py``: byte-level BPE and ``legacy=True`` keep
``""``; ``legacy=False`` needs ``" "`` (``""`` is one token short at the
position after the image, as the issue describes).

Kept out: prompts written by hand without the chat template (``"USER:
<image>\\nWhat ..."`` passed straight to the processor) still tokenize the
processor's way; only the chat template is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from asvr.train.data.templates import (
    IMAGE_PLACEHOLDER,
    IMAGE_SENTINEL,
    ConversationTemplate,
    render,
    tokenize_with_images,
)
from asvr.train.model.text_tokenizer import first_difference

AFTER_IMAGE = ("", " ")
"""Text the chat template puts between ``<image>`` and the ``\\n`` after it, tried in this order."""


@dataclass(frozen=True)
class Probe:
    name: str
    turns: tuple[tuple[str, str], ...]
    """(role, text) as ``validate_turns`` returns them (``<image>\\n`` at the front of its turn)."""
    generation: bool
    """True: the turns end with a question and the prompt ends where the answer starts."""

    @property
    def has_image(self) -> bool:
        return any(IMAGE_PLACEHOLDER in t for _, t in self.turns)


def probes(template: ConversationTemplate) -> list[Probe]:
    """The conversations checked for ``template`` (``plain`` has only image + caption)."""
    img = f"{IMAGE_PLACEHOLDER}\nWhat is in the picture?"
    if template.style == "plain":
        return [
            Probe("one-turn prompt", (("user", img),), True),
            Probe("one-turn conversation", (("user", img), ("assistant", "A red square on a blue USER.")), False),
        ]
    multi = (("user", img), ("assistant", "A red square."), ("user", "And the colour of the USER?"))
    text = (("user", "Say hello to the USER."), ("assistant", "Hello there."), ("user", "Again?"))
    return [
        Probe("one-turn prompt", multi[:1], True),
        Probe("multi-turn prompt", multi, True),
        Probe("multi-turn conversation", multi + (("assistant", "Blue, USER."),), False),
        Probe("text-only one-turn prompt", text[:1], True),
        Probe("text-only multi-turn prompt", text, True),
    ]


def messages(turns: Sequence[tuple[str, str]]) -> list[dict]:
    """Turns -> chat messages as transformers / lmms-eval pass them (the image as a typed part)."""
    out = []
    for role, text in turns:
        if role == "user" and IMAGE_PLACEHOLDER in text:
            content: object = [
                {"type": "image"},
                {"type": "text", "text": text.replace(IMAGE_PLACEHOLDER, "").strip()},
            ]
        elif role == "user":
            content = [{"type": "text", "text": text}]
        else:
            content = text
        out.append({"role": role, "content": content})
    return out


def training_ids(template, probe: Probe, tokenizer, image_tokens: int, image_id: int) -> list[int]:
    """The training stream of a probe: ``render`` + ``tokenize_with_images``, the image expanded."""
    text, _ = render(template, list(probe.turns), tokenizer, generation=probe.generation)
    ids = tokenize_with_images(text, tokenizer, template.add_special_tokens)
    return [x for t in ids for x in ([image_id] * image_tokens if t == IMAGE_SENTINEL else [t])]


def processor_ids(processor, probe: Probe, image_size: int) -> list[int]:
    """What the saved processor gives: ``apply_chat_template`` then ``processor(images=, text=)``."""
    from PIL import Image

    prompt = processor.apply_chat_template(messages(probe.turns), add_generation_prompt=probe.generation)
    images = [Image.new("RGB", (image_size, image_size), (120, 30, 200))] if probe.has_image else None
    ids = processor(images=images, text=prompt)["input_ids"]
    ids = ids[0] if ids and isinstance(ids[0], (list, tuple)) else ids
    return [int(i) for i in ids]


def _piece(tokenizer, i: int | None) -> str:
    if i is None:
        return "(end)"
    return f"{i} {tokenizer.convert_ids_to_tokens(int(i))!r}"


def check_processor(
    processor, template: ConversationTemplate, reference, image_tokens: int, image_size: int
) -> str | None:
    """None when the processor's ids equal the training ids on every probe, else one line:
    which probe, the first differing position and the two tokens there."""
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    for probe in probes(template):
        want = training_ids(template, probe, reference, image_tokens, image_id)
        got = processor_ids(processor, probe, image_size)
        at = first_difference(want, got)
        if at is not None:
            w = want[at] if at < len(want) else None
            g = got[at] if at < len(got) else None
            return (
                f"{template.name} {probe.name}: token {at} of {len(want)} is {_piece(reference, w)} in training, "
                f"{_piece(processor.tokenizer, g)} from the exported processor"
            )
    return None


def adds_special_tokens(tokenizer) -> bool:
    """Does ``tokenizer(text)`` add tokens (a BOS) around the text?"""
    return tokenizer("x")["input_ids"] != tokenizer("x", add_special_tokens=False)["input_ids"]


__all__ = ["AFTER_IMAGE", "Probe", "probes", "messages", "check_processor", "adds_special_tokens"]
