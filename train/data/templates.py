"""Conversation templates: LLaVA JSON turns -> token ids, labels and image positions.

A template is an explicit, frozen :class:`ConversationTemplate` passed to the
data code (the reference keeps it in a module global that the training script
mutates).  Four ship: :func:`plain` (pretraining: image + caption),
:func:`vicuna_v1` (LLaVA-1.5 / ASVR), :func:`chatml` (Qwen2 and friends) and
:func:`chatml_asvr` (the same ids, trained as ASVR's ``preprocess_qwen``).

The token stream is LLaVA's, built the way LLaVA builds it: the conversation
is rendered to one string (``Conversation.get_prompt``), ``<image>`` moved to
the front of its turn (``preprocess_multimodal``), and the string tokenized
in one go, split only at ``<image>`` (``tokenizer_image_token``: every chunk
tokenized with the tokenizer's special tokens, the BOS of every chunk but the
first dropped).  ``chatml`` is tokenized without special tokens, so a text
sample equals ``tokenizer.apply_chat_template`` of a Qwen2 tokenizer.

Labels are the tokens of each answer plus its end marker (``</s>`` for
vicuna_v1, ``<|im_end|>`` for chatml, the newline for plain).  LLaVA finds
them by re-tokenizing each round and counting lengths (with offsets for
non-legacy Llama tokenizers); when its count disagrees with the real stream
it prints "tokenization mismatch" and trains the sample with every label
masked.  Here every answer boundary (a character position in the rendered
string) is located exactly: the prefix of the string up to it, tokenized the
same way, must be a prefix of the stream; its length is the boundary.  Where
LLaVA's arithmetic is consistent the two agree token for token
(tests/test_train_templates.py re-implements LLaVA's preprocessing and
compares, slow and fast, legacy and not); where a boundary falls inside a
token the sample raises :class:`ConversationError` (a bad sample: refused,
or listed under ``--skip-bad-samples``), never silently all-masked.  Cost:
about the old piecewise encoding's (1 to 3 ms for a 1- to 8-round sample
with the tiny BPE tokenizer on the dev box; see :class:`~asvr.train.data.answer_tokens.AnswerBoundaries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from asvr.train.data.answer_tokens import (
    IMAGE_PLACEHOLDER,
    IMAGE_SENTINEL,
    AnswerBoundaries,
    ConversationError,
    asvr_qwen_trained,
    tokenize_with_images,
)

IGNORE_INDEX = -100
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
STYLES = ("plain", "two", "chatml")
LABELS = ("answers", "asvr_qwen")


@dataclass(frozen=True, kw_only=True)
class ConversationTemplate:
    """How a conversation is rendered to text (LLaVA's ``Conversation`` fields)."""

    name: str
    style: str
    """plain: ``<image>`` + answer + sep (LLaVA SeparatorStyle.PLAIN); two: ``system sep ROLE: msg sep|sep2``
    (SeparatorStyle.TWO); chatml: ``<|im_start|>role\\nmsg<|im_end|>\\n``."""
    system: str = ""
    """System prompt ('' = none)."""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    """After a question (two) / after the answer (plain)."""
    sep2: str | None = ""
    """After an answer (two); None: the tokenizer's EOS token (vicuna_v1's ``</s>``)."""
    add_special_tokens: bool = True
    """Tokenize with the tokenizer's special tokens (BOS): LLaVA's ``tokenizer(chunk)``; chatml: off."""
    labels: str = "answers"
    """Which tokens train: ``answers`` (each answer + its end marker, LLaVA's rule) or
    ``asvr_qwen`` (chatml only: ASVR's ``preprocess_qwen``, see :func:`chatml_asvr`)."""

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"template style must be one of {STYLES}, got {self.style!r}")
        if self.labels not in LABELS or (self.labels == "asvr_qwen" and self.style != "chatml"):
            raise ValueError(f"template labels must be one of {LABELS} (asvr_qwen: chatml only), got {self.labels!r}")

    def answer_end(self, tokenizer) -> str:
        """The trained end-of-answer marker as text."""
        if self.style == "plain":
            return self.sep
        if self.style == "chatml":
            return "<|im_end|>"
        if self.sep2 is not None:
            return self.sep2
        if not tokenizer.eos_token:
            raise ConversationError(f"template {self.name} ends answers with the EOS token; the tokenizer has none")
        return tokenizer.eos_token

    @property
    def assistant_suffix(self) -> str:
        """The end-of-answer marker where it does not depend on the tokenizer ('' for vicuna_v1: the EOS)."""
        return {"plain": self.sep, "chatml": "<|im_end|>"}.get(self.style, self.sep2 or "")


VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA's ``conv_vicuna_v1`` system prompt (llava/conversation.py), used by LLaVA-1.5 and ASVR."""


def plain() -> ConversationTemplate:
    """LLaVA ``plain``: ``<bos> IMAGE caption\\n``, labels on the caption and newline."""
    return ConversationTemplate(name="plain", style="plain", sep="\n")


def vicuna_v1() -> ConversationTemplate:
    """LLaVA-1.5 ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``."""
    return ConversationTemplate(
        name="vicuna_v1", style="two", system=VICUNA_V1_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2=None
    )


def chatml() -> ConversationTemplate:
    """ChatML (Qwen2): ``<|im_start|>role\\ncontent<|im_end|>\\n``; needs those special tokens."""
    return ConversationTemplate(
        name="chatml",
        style="chatml",
        system="You are a helpful assistant.",
        roles=("user", "assistant"),
        add_special_tokens=False,
    )


def chatml_asvr() -> ConversationTemplate:
    """``chatml`` ids with ASVR's ``preprocess_qwen`` labels (ASVR ``train.py``): every assistant
    message trains whole (``<|im_start|>assistant\\n`` ... ``<|im_end|>\\n``), and so does every
    ``<|im_start|>``, ``<|im_end|>`` and standalone ``\\n`` token anywhere, system and user
    turns included.  ``chatml`` (the default) trains only each answer and its ``<|im_end|>``,
    as LLaVA's rule for the other templates (docs/FIDELITY.md)."""
    return ConversationTemplate(
        name="chatml_asvr",
        style="chatml",
        system="You are a helpful assistant.",
        roles=("user", "assistant"),
        add_special_tokens=False,
        labels="asvr_qwen",
    )


TEMPLATES: dict[str, Callable[[], ConversationTemplate]] = {
    "plain": plain,
    "vicuna_v1": vicuna_v1,
    "chatml": chatml,
    "chatml_asvr": chatml_asvr,
}


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
    text: str = ""
    """The rendered conversation (``<image>`` where the image positions are)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> np.ndarray:
        return np.where(self.trained, self.input_ids.astype(np.int64), IGNORE_INDEX)

    def truncated(self, max_len: int) -> "EncodedSample":
        return EncodedSample(self.input_ids[:max_len], self.trained[:max_len], self.image_mask[:max_len], self.text)


def validate_turns(turns: Any, has_image: bool) -> list[tuple[str, str]]:
    """LLaVA ``conversations`` -> ``[(role, text)]`` with role 'user'/'assistant'.

    Requires alternating human/gpt turns starting with human and ending with
    gpt, non-empty string values, at most one ``<image>`` (in a question, and
    none without an image).  As LLaVA's ``preprocess_multimodal``, the
    ``<image>`` of a sample with an image moves to the front of its turn
    (``<image>\\n`` + the rest, stripped).  A sample with an image but no
    placeholder keeps its text as is: LLaVA then trains it without the image
    (``plain`` refuses it, as LLaVA asserts)."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError("conversations is not a non-empty list")
    out = [_turn(i, t) for i, t in enumerate(turns)]
    if out[-1][0] != "assistant":
        raise ConversationError("the last turn is not an answer")
    n_img = sum(text.count(IMAGE_PLACEHOLDER) for _, text in out)
    if any(IMAGE_PLACEHOLDER in text for role, text in out if role == "assistant"):
        raise ConversationError("<image> inside an answer")
    if n_img > 1:
        raise ConversationError(f"{n_img} <image> placeholders (one image per sample)")
    if n_img and not has_image:
        raise ConversationError("<image> placeholder but no image")
    return [(role, move_image_first(text)) for role, text in out]


def _turn(i: int, t: Any) -> tuple[str, str]:
    """Turn ``i`` of a LLaVA conversation -> ``(role, text)``, in the human/gpt alternation."""
    if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
        raise ConversationError(f"turn {i} is not {{from, value: str}}")
    role = "user" if t["from"] in USER_ROLES else "assistant" if t["from"] in ASSISTANT_ROLES else None
    if role is None:
        raise ConversationError(f"turn {i} is from {t['from']!r}, not human/gpt")
    if role != ("user" if i % 2 == 0 else "assistant"):
        raise ConversationError(f"turn {i} breaks the human/gpt alternation")
    if not t["value"]:
        raise ConversationError(f"turn {i} is empty")
    return role, t["value"]


def move_image_first(text: str) -> str:
    """LLaVA ``preprocess_multimodal`` on one turn: ``<image>\\n`` + the rest, stripped."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    return (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def render(
    template: ConversationTemplate, turns: Sequence[tuple[str, str]], tokenizer, generation: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Turns -> (the prompt string, character spans ``[start, end)`` of the trained text).

    ``generation``: the turns end with a question; the string ends where the
    answer starts (``... ASSISTANT:`` as LLaVA's eval, ``<|im_start|>assistant\\n``)."""
    if template.style == "plain":
        return _render_plain(template, turns, generation)
    end = template.answer_end(tokenizer)
    spans: list[tuple[int, int]] = []
    if template.style == "two":
        user, assistant = template.roles
        s = template.system + template.sep
        for role, msg in turns:
            if role == "user":
                s += f"{user}: {msg}{template.sep}"
            else:
                s += f"{assistant}:"
                start = len(s)
                s += f" {msg}{end}"
                spans.append((start, len(s)))
        return (s + f"{assistant}:" if generation else s), spans
    s = f"<|im_start|>system\n{template.system}<|im_end|>\n" if template.system else ""
    for role, msg in turns:
        s += f"<|im_start|>{template.roles[0] if role == 'user' else template.roles[1]}\n"
        if role == "user":
            s += f"{msg}{end}\n"
        else:
            start = len(s)
            s += f"{msg}{end}"
            spans.append((start, len(s)))
            s += "\n"
    return (s + f"<|im_start|>{template.roles[1]}\n" if generation else s), spans


def _render_plain(
    template: ConversationTemplate, turns: Sequence[tuple[str, str]], generation: bool
) -> tuple[str, list[tuple[int, int]]]:
    # LLaVA preprocess_plain: asserts two turns and an <image> in the first, which becomes just "<image>"
    if len(turns) != (1 if generation else 2) or IMAGE_PLACEHOLDER not in turns[0][1]:
        raise ConversationError("the plain template needs one question holding <image> and one answer")
    if generation:
        return IMAGE_PLACEHOLDER, []
    s = IMAGE_PLACEHOLDER + turns[1][1] + template.sep
    return s, [(len(IMAGE_PLACEHOLDER), len(s))]


def encode_conversation(
    template: ConversationTemplate,
    turns: list[tuple[str, str]],
    tokenizer,
    image_tokens: int,
    image_id: int | None = None,
) -> EncodedSample:
    """Validated turns (:func:`validate_turns`) -> :class:`EncodedSample` (see module doc).

    ``image_tokens`` = H*W positions per ``<image>``; ``image_id`` fills them
    (default: the pad id, else 0; the model overwrites those embeddings)."""
    check_literal_specials(turns, tokenizer)
    text, spans = render(template, turns, tokenizer)
    ids = tokenize_with_images(text, tokenizer, template.add_special_tokens)
    marker = template.answer_end(tokenizer) if template.style != "plain" else ""
    bounds = AnswerBoundaries(marker, text, ids, tokenizer, template.add_special_tokens)
    trained = np.zeros(len(ids), bool)
    if template.labels == "asvr_qwen":
        trained = asvr_qwen_trained(template.roles[1], text, ids, spans, bounds, tokenizer)
    for start, end in spans if template.labels == "answers" else ():
        a = bounds.start(start)
        b = bounds.end(end, start, a)
        if b <= a:
            raise ConversationError("an answer encodes to no tokens")
        trained[a:b] = True
    return _expand(ids, trained, image_tokens, _image_id(tokenizer, image_id), text)


def special_strings(tokenizer) -> list[str]:
    """The strings the tokenizer turns into special ids wherever they appear (``</s>``, ``<s>``,
    ``<|im_end|>``, ...), ``<image>`` aside (the placeholder is split out before tokenizing)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {str(t) for t in decoder.values() if getattr(t, "special", False)}
    return sorted(t for t in found if t and t != IMAGE_PLACEHOLDER)


def check_literal_specials(turns: list[tuple[str, str]], tokenizer) -> None:
    """Refuse a turn whose text holds a special token's string: tokenized in one go with the
    template, a literal ``</s>`` in an answer became the EOS id (a trained stop in mid-answer) and
    ``<|im_end|>`` a turn end.  The template's own markers are added after this check."""
    specials = special_strings(tokenizer)
    for i, (_, value) in enumerate(turns):
        hit = next((t for t in specials if t in value), None)
        if hit is not None:
            raise ConversationError(
                f"turn {i + 1} holds the literal text {hit!r}, a special token of the tokenizer that would not "
                "stay text (remove or reword it)"
            )


def encode_generation_prompt(
    template: ConversationTemplate,
    turns: list[tuple[str, str]],
    tokenizer,
    image_tokens: int,
    image_id: int | None = None,
) -> EncodedSample:
    """The prompt for generating the next answer (``turns`` end with a question): LLaVA's eval prompt."""
    text, _ = render(template, turns, tokenizer, generation=True)
    ids = tokenize_with_images(text, tokenizer, template.add_special_tokens)
    return _expand(ids, np.zeros(len(ids), bool), image_tokens, _image_id(tokenizer, image_id), text)


def encode_image_only(
    template: ConversationTemplate, tokenizer, image_tokens: int, image_id: int | None = None
) -> EncodedSample:
    """A caption-free sample: (BOS +) the image positions, no text labels."""
    ids = tokenize_with_images(IMAGE_PLACEHOLDER, tokenizer, template.add_special_tokens)
    return _expand(ids, np.zeros(len(ids), bool), image_tokens, _image_id(tokenizer, image_id), IMAGE_PLACEHOLDER)


def _expand(ids: list[int], trained: np.ndarray, image_tokens: int, image_id: int, text: str) -> EncodedSample:
    """One :data:`IMAGE_SENTINEL` -> ``image_tokens`` positions holding ``image_id``."""
    arr = np.asarray(ids, np.int64)
    is_img = arr == IMAGE_SENTINEL
    reps = np.where(is_img, image_tokens, 1)
    out = np.repeat(arr, reps)
    img = np.repeat(is_img, reps)
    out[img] = image_id
    return EncodedSample(out.astype(np.int32), np.repeat(trained, reps) & ~img, img, text)


def _image_id(tokenizer, image_id: int | None) -> int:
    if image_id is not None:
        return image_id
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
