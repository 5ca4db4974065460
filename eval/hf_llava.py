"""Benchmark a Hugging Face LLaVA folder (``LlavaForConditionalGeneration``) with this harness.

``asvr-eval bench --model OUT`` accepts, besides ASVR runs, any folder that
transformers loads as a LLaVA: an ``asvr-export --hf-llava`` export, or a
LLaVA-1.5 checkpoint trained elsewhere (e.g. a local copy of
``llava-hf/llava-1.5-7b-hf``).  The prompt is the folder's own chat template
(``processor.apply_chat_template`` with the image first and the same question
text as for ASVR runs), decoding is greedy, images are decoded by this
project's loader (RGB, EXIF orientation applied) and preprocessed by the
folder's processor.  On an ``asvr-export`` folder the answers equal those of
``asvr-eval bench --model RUN`` (tests/test_hf_llava_export.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from asvr.tokenizer.preprocess import ImageError, llava_mode, open_image, preprocess_mode, read_file
from asvr.train.export.hf_llava import INPUTS_FILE, read_hf_inputs

from asvr.eval.formats.base import BenchError, BenchItem
from asvr.eval.generate import GenerationConfig, check_fits, context_length, question_text

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor


@dataclass
class HFLlavaModel:
    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    folder: Path
    device: torch.device

    def info(self) -> dict:
        rec = read_hf_inputs(self.folder)
        return {
            "model": str(self.folder),
            "run": None,
            "vision_input": "hf-llava",
            "template": rec.get("template", "chat_template") if rec else "chat_template",
            "template_source": f"{self.folder}'s chat template"
            + (f" (trained as {rec.get('template')}, {self.folder / INPUTS_FILE})" if rec else ""),
            "trained_inputs": rec,
            "tokenizer_fingerprint": None,
            "device": str(self.device),
        }

    @property
    def preprocess_mode(self) -> str:
        return llava_mode(bool(getattr(self.processor.image_processor, "do_pad", False)))

    @property
    def preprocess_source(self) -> str:
        """The processor's ``do_pad`` (what transformers applies); the export's record says the same."""
        rec = read_hf_inputs(self.folder)
        note = f"; {INPUTS_FILE} records {rec.get('preprocess')}" if rec else ""
        return f"{self.folder}'s image processor (do_pad){note}"

    def _image(self, item: BenchItem):
        data = item.image if isinstance(item.image, bytes) else read_file(item.image)
        try:
            return open_image(data)
        except ImageError as e:
            raise BenchError(f"{item.source}: cannot read image ({e})") from None

    def _prompt(self, item: BenchItem, instructions: str) -> str:
        content = ([{"type": "image"}] if item.image is not None else []) + [
            {"type": "text", "text": question_text(item, instructions)}
        ]
        # transformers types message content as str only; a list of typed parts is its multimodal form.
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}],  # type: ignore[arg-type]
            add_generation_prompt=True,
        )

    @torch.no_grad()
    def answer(self, items: Sequence[BenchItem], cfg: GenerationConfig) -> list[str]:
        """Greedy answers in the order of ``items``; one prompt per ``generate`` call (the
        folder's chat template decides padding-sensitive details, so no batching)."""
        from tqdm import tqdm

        if cfg.preprocess_mode is not None:
            self.processor.image_processor.do_pad = bool(preprocess_mode(cfg.preprocess_mode).llava_do_pad)
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        context = context_length(self.model.config)
        out = []
        for item in tqdm(items, desc="generating", unit="q", disable=not cfg.progress):
            images = [self._image(item)] if item.image is not None else None
            inputs = self.processor(images=images, text=self._prompt(item, cfg.instructions), return_tensors="pt").to(
                self.device
            )
            check_fits(item, int(inputs["input_ids"].shape[1]), cfg.max_new_tokens, context)
            new = self.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1)[
                0, inputs["input_ids"].shape[1] :
            ].tolist()
            cut = next((i for i, t in enumerate(new) if t in stop), len(new))
            out.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
        return out


def load_hf_llava(folder: str | Path, device: torch.device) -> HFLlavaModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(folder)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BenchError(f"{folder}: cannot load as a Hugging Face LLaVA ({str(e).splitlines()[0][:160]})") from None
    # transformers' decorator on PreTrainedModel.to loses the method's self binding in its typing.
    model = model.to(device).eval()  # type: ignore[arg-type]
    return HFLlavaModel(model=model, processor=processor, folder=folder, device=device)
