"""Greedy answers to benchmark questions through ``ASVRModel.generate``.

Prompts are laid out by the run's conversation template with the trainer's
own encoding (``encode_generation_prompt``: the same rendering and
tokenization as training): the question (image first, as LLaVA) and the
answer opener, ``... ASSISTANT:`` for vicuna_v1 (LLaVA's eval prompt; the
answer's first token carries its space, as in training),
``<|im_start|>assistant\\n`` for chatml (``add_generation_prompt``).

Images become the model's vision input in-process, as its vision input
says (``VisionInputMode.from_images``): ``online`` -> pixels preprocessed for
the vision tower, ``features`` -> the tower's features, ``codes`` ->
``SemanticTokenizer.encode_pixels`` (the bench images need no shards).
Items are sorted by image so each image is decoded and encoded once per batch and shared by its questions (POPE asks three files
of questions about the same 500 images; MME two per image).

Batches are left-padded with a 2D attention mask; greedy decoding of a
left-padded batch gives the same tokens as one prompt at a time
(``tests/test_eval_model.py::test_bench_online_model_matches_batched_and_single``
checks it on a tiny model) up to float ties.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence, cast

import numpy as np
import torch

from asvr.tokenizer.preprocess import PREPROCESS_MODES, ImageError
from asvr.train.data.templates import IMAGE_PLACEHOLDER, encode_generation_prompt
from asvr.train.model.vision_input import get_vision_input

from asvr.eval.formats.base import BenchError, BenchItem
from asvr.eval.loading import EvalError, LoadedModel

INSTRUCTIONS = {
    "lmms-eval": {  # items without an lmms-eval task (the generic JSONL): LLaVA's instructions
        "yes_no": "Answer the question using a single word or phrase.",
        "short": "Answer the question using a single word or phrase.",
        "multiple_choice": "Answer with the option's letter from the given choices directly.",
    },
    "llava": {
        "yes_no": "Answer the question using a single word or phrase.",
        "short": "Answer the question using a single word or phrase.",
        "multiple_choice": "Answer with the option's letter from the given choices directly.",
    },
    "none": {"yes_no": "", "short": "", "multiple_choice": ""},
}


def question_text(item: BenchItem, instructions: str = "lmms-eval") -> str:
    """The user turn (without the image).  ``lmms-eval``: lmms-eval's own prompt for the item's
    task (:data:`asvr.eval.lmms_rules.PROMPTS`; items without one as ``llava``); ``llava``:
    hint, question, options, LLaVA's instruction, one per line; ``none``: without the instruction."""
    from asvr.eval.lmms_rules import PROMPTS

    if instructions == "lmms-eval" and item.task in PROMPTS:
        return PROMPTS[item.task](item)
    parts = []
    if item.hint:
        parts.append(item.hint)
    parts.append(item.question)
    if item.options:
        parts.extend(f"{chr(65 + i)}. {o}" for i, o in enumerate(item.options))
    extra = INSTRUCTIONS[instructions][item.kind]
    if extra:
        parts.append(extra)
    return "\n".join(parts)


def encode_prompt(lm: LoadedModel, text: str, has_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids int64 [L], image_mask bool [L]) of the prompt up to the answer."""
    user = (IMAGE_PLACEHOLDER + "\n" + text) if has_image else text
    enc = encode_generation_prompt(lm.template, [("user", user)], lm.text_tokenizer, lm.model.cfg.image_tokens)
    return enc.input_ids.astype(np.int64), enc.image_mask


@dataclass(kw_only=True)
class GenerationConfig:
    """How benchmark answers are generated: options of ``asvr-eval bench`` (``asvr.core.config_cli``)."""

    batch_size: int = 8
    """Questions per generate call."""
    max_new_tokens: int = 16
    """Answer length limit."""
    instructions: str = field(default="lmms-eval", metadata={"choices": tuple(INSTRUCTIONS)})
    """lmms-eval: each task's lmms-eval prompt (POPE, MME without ' Please answer yes or no.', MMBench 'There are
    several options:', ScienceQA 'Context:'; generic JSONL items get LLaVA's); llava: hint, question, options and
    LLaVA's answer-format instruction, one per line (the prompts before lmms-eval's became the default); none: the
    bare question."""
    preprocess_mode: str | None = field(
        default=None, metadata={"flag": "--preprocess", "aliases": ("--preprocess-mode",), "choices": PREPROCESS_MODES}
    )
    """Image preprocessing (default: the training preprocessing recorded in the export, else the tokenizer's; LLaVA
    instruction tuning used pad); the report says which was used."""
    # the old flag name (before --preprocess, as in asvr-pipeline tokenize) is still parsed, not shown
    progress: bool = field(default=True, metadata={"flag": "--quiet"})
    """(--quiet) no progress bar."""

    def __post_init__(self):
        if self.instructions not in INSTRUCTIONS:
            raise EvalError(f"instructions must be one of {sorted(INSTRUCTIONS)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise EvalError("--max-new-tokens and --batch-size must be >= 1")


class VisionEncoder:
    """Benchmark images -> the model's vision input (see module doc)."""

    def __init__(self, lm: LoadedModel, mode: str | None = None):
        self.kind = get_vision_input(lm.vision_input)
        if lm.tower is None and lm.image_tokenizer is None:
            raise EvalError("benchmark images need the model's vision tower or semantic tokenizer (with its encoder)")
        self.lm = lm
        self.mode = mode or lm.preprocess

    def _encode(self, items: Sequence[BenchItem]) -> torch.Tensor:
        return self.kind.from_images(
            [it.image for it in items], tower=self.lm.tower, tokenizer=self.lm.image_tokenizer, preprocess=self.mode
        )

    @torch.no_grad()
    def __call__(self, items: Sequence[BenchItem]) -> torch.Tensor:
        try:
            return self._encode(items)
        except (OSError, ImageError) as e:
            for it in items:  # name the first bad one
                try:
                    self._encode([it])
                except (OSError, ImageError) as e1:
                    raise BenchError(f"{it.source}: cannot read image ({e1})") from None
            raise BenchError(f"{items[0].source}: cannot read images ({e})") from None


def context_length(config) -> int | None:
    """Positions the LLM was built for (``max_position_embeddings`` of its config, or of a LLaVA
    config's ``text_config``); None when the config does not say."""
    for c in (config, getattr(config, "text_config", None)):
        n = getattr(c, "max_position_embeddings", None) if c is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_fits(item: BenchItem, prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse (one line naming the item) a prompt that, with the answer, exceeds the model's context:
    positions past it are untrained (rotary) or missing (learned), and attention over a 100k-character
    question asked for 17 GB before the kernel stopped it.  Refused rather than cut: a cut question
    is another question."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise BenchError(
            f"{item.source}: item {item.id!r} needs {prompt_tokens} prompt tokens + {max_new_tokens} new "
            f"(--max-new-tokens), more than the model's context of {context} positions: "
            "the question is too long (refused, not truncated)"
        )


def _stop_ids(lm: LoadedModel) -> list[int]:
    tok = lm.text_tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    suffix = lm.template.assistant_suffix  # vicuna_v1: the EOS, already in ids
    if suffix:
        enc = tok(suffix, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    return sorted(set(ids))


def _decode(lm: LoadedModel, ids: Sequence[int], stop: Sequence[int]) -> str:
    ids = list(ids)
    cut = [ids.index(t) for t in stop if t in ids]
    ids = ids[: min(cut)] if cut else ids
    # One sequence decodes to one str (transformers types decode for batches too: str | list[str]).
    text = cast(str, lm.text_tokenizer.decode(ids, skip_special_tokens=True))
    suffix = lm.template.assistant_suffix.strip()  # '' for vicuna_v1: its EOS stops generation
    if suffix and suffix in text:
        text = text.split(suffix)[0]
    return text.strip()


def ask(lm: LoadedModel, image: str | os.PathLike | bytes | None, question: str, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to one free-form question about one image (a path or
    encoded image bytes; None: a text-only question), laid out as in training.
    ``lm`` comes from ``load_for_eval(RUN, need_encoder=True)``."""
    if image is not None and not isinstance(image, bytes):
        image = os.fspath(image)
    key = None if image is None else (image if isinstance(image, str) else "bytes")
    item = BenchItem(
        id="ask",
        question=question,
        kind="short",
        answer=None,
        raw_answer=None,
        image=image,
        image_key=key,
        source=key or "question",
    )
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=1, instructions="none", progress=False)
    return generate_answers(lm, [item], cfg)[0]


@torch.no_grad()
def generate_answers(lm: LoadedModel, items: Sequence[BenchItem], cfg: GenerationConfig) -> list[str]:
    """Greedy answers, in the order of ``items``."""
    from tqdm import tqdm

    model = lm.model
    model.eval()
    encoder = VisionEncoder(lm, cfg.preprocess_mode)
    prompts = [encode_prompt(lm, question_text(it, cfg.instructions), it.image is not None) for it in items]
    context = context_length(model.llm.config)
    for it, (p_ids, _) in zip(items, prompts):  # every item checked before the first answer
        check_fits(it, len(p_ids), cfg.max_new_tokens, context)
    order = sorted(range(len(items)), key=lambda i: (items[i].image_key or "", len(prompts[i][0])))
    pad = lm.text_tokenizer.pad_token_id if lm.text_tokenizer.pad_token_id is not None else 0
    stop = _stop_ids(lm)
    answers: list[str] = [""] * len(items)
    bar = tqdm(total=len(items), desc="generating", unit="q", disable=not cfg.progress)
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        width = max(len(prompts[i][0]) for i in idx)
        ids = np.full((len(idx), width), pad, np.int64)
        img = np.zeros((len(idx), width), bool)
        att = np.zeros((len(idx), width), np.int64)
        for r, i in enumerate(idx):  # left padding
            p_ids, p_img = prompts[i]
            ids[r, width - len(p_ids) :] = p_ids
            img[r, width - len(p_ids) :] = p_img
            att[r, width - len(p_ids) :] = 1
        with_image = [items[i] for i in idx if items[i].image is not None]
        vision = None
        if with_image:  # one encoding per distinct image of the batch
            uniq: dict[str | None, int] = {}
            for it in with_image:
                uniq.setdefault(it.image_key, len(uniq))
            first: dict[str | None, BenchItem] = {}
            for it in with_image:
                first.setdefault(it.image_key, it)
            enc = encoder([first[k] for k in uniq])
            vision = enc[torch.tensor([uniq[it.image_key] for it in with_image])].to(lm.device)
        out = model.generate(
            torch.from_numpy(ids).to(lm.device),
            torch.from_numpy(img).to(lm.device),
            vision,
            attention_mask=torch.from_numpy(att).to(lm.device),
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=stop or None,
        )
        for r, i in enumerate(idx):
            answers[i] = _decode(lm, out[r].tolist(), stop)
        bar.update(len(idx))
    bar.close()
    return answers
