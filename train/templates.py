"""Conversation templates: LLaVA JSON turns -> token ids, labels and image positions.

A template is an explicit, frozen :class:`ConversationTemplate` passed to the
data code (the reference keeps it in a module global that the training script
mutates).  Three ship: :func:`plain` (pretraining: image + caption),
:func:`vicuna_v1` (LLaVA-1.5) and :func:`chatml` (Qwen2 and friends).

Text is tokenized piece by piece (prefixes, each message, suffixes), never as
one rendered string, so labels line up with the assistant turns by
construction.  For SentencePiece / byte-level BPE this can split a word
boundary differently from tokenizing the whole prompt at once (the reference
tokenizes the whole prompt and then re-tokenizes each turn to find the
boundaries, which misaligns labels when the two disagree: its
"tokenization mismatch" warning).  Labels are set only on assistant turns and
their end marker; every image takes ``H*W`` positions marked in ``image_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ConversationError(ValueError):
    """A malformed conversation (reason in the message)."""


@dataclass(frozen=True, kw_only=True)
class ConversationTemplate:
    """How a conversation is laid out as text; pieces marked *trained* get labels."""

    name: str
    system: str = ""
    """System prompt ('' = none)."""
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    """Before each answer (not trained)."""
    assistant_suffix: str = ""
    """After each answer, trained (the end-of-answer marker the model must learn)."""
    assistant_eos: bool = False
    """Append the tokenizer's EOS after each answer, trained (vicuna_v1's ``</s>``)."""
    turn_suffix: str = ""
    """After each answer's end marker, not trained (chatml's newline)."""
    user_image_only: bool = False
    """plain: the human turn is reduced to the image (its text is dropped)."""
    add_bos: bool = True
    """Start with the tokenizer's BOS when it has one."""


def plain() -> ConversationTemplate:
    """LLaVA ``plain``: ``<bos> IMAGE caption\\n``, labels on the caption and newline."""
    return ConversationTemplate(name="plain", assistant_suffix="\n", user_image_only=True)


def vicuna_v1() -> ConversationTemplate:
    """LLaVA-1.5 ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``."""
    return ConversationTemplate(
        name="vicuna_v1",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        system_suffix=" ", user_prefix="USER: ", user_suffix=" ", assistant_prefix="ASSISTANT: ",
        assistant_eos=True)


def chatml() -> ConversationTemplate:
    """ChatML (Qwen2): ``<|im_start|>role\\ncontent<|im_end|>\\n``; needs those special tokens."""
    return ConversationTemplate(
        name="chatml", system="You are a helpful assistant.", system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n", user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>", turn_suffix="\n", add_bos=False)


TEMPLATES: dict[str, Callable[[], ConversationTemplate]] = {"plain": plain, "vicuna_v1": vicuna_v1, "chatml": chatml}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]()
    except KeyError:
        raise ValueError(f"unknown template {name!r}; one of {sorted(TEMPLATES)}") from None


@dataclass
class EncodedSample:
    """One tokenized sample. ``input_ids`` hold ``image_id`` at image positions."""

    input_ids: np.ndarray  # int32 [L]
    trained: np.ndarray  # bool [L]: label = input_id there, else -100
    image_mask: np.ndarray  # bool [L]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> np.ndarray:
        return np.where(self.trained, self.input_ids.astype(np.int64), IGNORE_INDEX)

    def truncated(self, max_len: int) -> "EncodedSample":
        return EncodedSample(self.input_ids[:max_len], self.trained[:max_len], self.image_mask[:max_len])


def validate_turns(turns: Any, has_image: bool) -> list[tuple[str, str]]:
    """LLaVA ``conversations`` -> ``[(role, text)]`` with role 'user'/'assistant'.

    Requires alternating human/gpt turns starting with human and ending with
    gpt, string values, at most one ``<image>`` (and none without an image)."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError("conversations is not a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            raise ConversationError(f"turn {i} is not {{from, value: str}}")
        role = "user" if t["from"] in USER_ROLES else "assistant" if t["from"] in ASSISTANT_ROLES else None
        if role is None:
            raise ConversationError(f"turn {i} is from {t['from']!r}, not human/gpt")
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ConversationError(f"turn {i} breaks the human/gpt alternation")
        out.append((role, t["value"]))
    if out[-1][0] != "assistant":
        raise ConversationError("the last turn is not an answer")
    n_img = sum(text.count(IMAGE_PLACEHOLDER) for _, text in out)
    if any(IMAGE_PLACEHOLDER in text for role, text in out if role == "assistant"):
        raise ConversationError("<image> inside an answer")
    if n_img > 1:
        raise ConversationError(f"{n_img} <image> placeholders (one image per sample)")
    if n_img and not has_image:
        raise ConversationError("<image> placeholder but no image")
    if has_image and not n_img:  # as LLaVA: the image goes before the first question
        out[0] = (out[0][0], IMAGE_PLACEHOLDER + "\n" + out[0][1])
    return out


class _Builder:
    def __init__(self, tokenizer, image_id: int):
        self.tok = tokenizer
        self.image_id = image_id
        self.ids: list[int] = []
        self.trained: list[bool] = []
        self.image: list[bool] = []

    def text(self, s: str, train: bool = False) -> None:
        if s:
            self.tokens(self.tok(s, add_special_tokens=False)["input_ids"], train)

    def tokens(self, ids: Sequence[int], train: bool = False) -> None:
        self.ids.extend(ids)
        self.trained.extend([train] * len(ids))
        self.image.extend([False] * len(ids))

    def image_block(self, n: int) -> None:
        self.ids.extend([self.image_id] * n)
        self.trained.extend([False] * n)
        self.image.extend([True] * n)

    def user_text(self, s: str, image_tokens: int) -> None:
        parts = s.split(IMAGE_PLACEHOLDER)
        for j, part in enumerate(parts):
            if j:
                self.image_block(image_tokens)
            self.text(part)

    def done(self) -> EncodedSample:
        return EncodedSample(np.asarray(self.ids, np.int32), np.asarray(self.trained, bool),
                             np.asarray(self.image, bool))


def encode_conversation(template: ConversationTemplate, turns: list[tuple[str, str]], tokenizer,
                        image_tokens: int, image_id: int | None = None) -> EncodedSample:
    """Validated turns (:func:`validate_turns`) -> :class:`EncodedSample`.

    ``image_tokens`` = H*W positions per ``<image>``; ``image_id`` fills them
    (default: the pad id, else 0; the model overwrites those embeddings)."""
    b = _Builder(tokenizer, _image_id(tokenizer, image_id))
    if template.add_bos and tokenizer.bos_token_id is not None:
        b.tokens([tokenizer.bos_token_id])
    if template.system:
        b.text(template.system_prefix + template.system + template.system_suffix)
    for role, text in turns:
        if role == "user":
            if template.user_image_only:
                if IMAGE_PLACEHOLDER in text:
                    b.image_block(image_tokens)
                continue
            b.text(template.user_prefix)
            b.user_text(text, image_tokens)
            b.text(template.user_suffix)
        else:
            b.text(template.assistant_prefix)
            b.text(text + template.assistant_suffix, train=True)
            if template.assistant_eos:
                if tokenizer.eos_token_id is None:
                    raise ConversationError(f"template {template.name} needs an EOS token; the tokenizer has none")
                b.tokens([tokenizer.eos_token_id], train=True)
            b.text(template.turn_suffix)
    return b.done()


def encode_image_only(template: ConversationTemplate, tokenizer, image_tokens: int,
                      image_id: int | None = None) -> EncodedSample:
    """A caption-free sample: (BOS +) the image positions, no text labels."""
    b = _Builder(tokenizer, _image_id(tokenizer, image_id))
    if template.add_bos and tokenizer.bos_token_id is not None:
        b.tokens([tokenizer.bos_token_id])
    b.image_block(image_tokens)
    return b.done()


def _image_id(tokenizer, image_id: int | None) -> int:
    if image_id is not None:
        return image_id
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
