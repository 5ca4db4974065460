"""When LLaVA's non-legacy -1 round offset is exact and when it masks a whole sample.

LLaVA's ``preprocess_v1`` counts a later round (``"USER: q ASSISTANT: a"``, cut at
``</s>``) by tokenizing it on its own: a BOS and SentencePiece's dummy prefix ``▁``
on ``USER``; in the stream the round follows ``</s>`` and, non-legacy, has no ``▁``.
The BOS stands in for the round's ``</s>``; the -1 assumes ``▁USER`` takes exactly one
piece more than ``USER``.  Vicuna's vocabulary has ``USER`` as one piece and ``▁USER``
as two (``▁US`` ``ER``: " USER" is two pieces), so LLaVA's labels are exact there; with
a vocabulary where both take the same count (tests/test_train_templates.py: ``▁US ER``
vs ``US ER``) every multi-turn sample is a "tokenization mismatch", all masked.

The LLaVA reference and the tokenizers come from tests/test_train_templates.py (LLaVA's
code re-implemented there); here a vocabulary with Vicuna's split is trained."""

from __future__ import annotations

import pytest

from test_train_templates import CONVS, SlowLlama, _expand, _ours, _train_sp, ref_preprocess_plain, ref_preprocess_v1

from asvr.train.data.templates import plain, vicuna_v1

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def vicuna_split():
    """'USER' one piece, ' USER' two (▁ + USER), as in Vicuna's vocabulary."""
    return SlowLlama(_train_sp(["USER"]), legacy=False)


@pytest.fixture(scope="module")
def llama_toks(tmp_path_factory):
    """The Llama tokenizers of tests/test_train_templates.py: Hugging Face and slow, legacy and not."""
    import json

    from transformers import LlamaTokenizer

    proto = _train_sp()
    d = tmp_path_factory.mktemp("llama_tok22")
    (d / "tokenizer.model").write_bytes(proto)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    out: dict = {}
    for legacy in (True, False):
        out[f"hf-legacy={legacy}"] = LlamaTokenizer.from_pretrained(d, legacy=legacy)
        out[f"slow-legacy={legacy}"] = SlowLlama(proto, legacy)
    return out


def _after_eos(tok) -> list[int]:
    """The pieces of ``USER`` in the stream after ``</s>`` (non-legacy: no ▁)."""
    ids = tok("x</s>USER", add_special_tokens=False)["input_ids"]
    return ids[ids.index(tok.eos_token_id) + 1 :]


def test_the_vocabulary_splits_like_vicunas(vicuna_split):
    assert len(vicuna_split.sp.encode("USER")) == 2 and len(_after_eos(vicuna_split)) == 1


@pytest.mark.parametrize("name", [n for n, (_, c) in CONVS.items() if len(c) > 2])
def test_minus_one_offset_is_exact_with_vicunas_split(vicuna_split, name):
    has_image, conv = CONVS[name]
    ids, labels, mismatch = ref_preprocess_v1(conv, vicuna_split, has_image)
    assert not mismatch  # LLaVA trains the sample
    enc = _ours(vicuna_v1(), conv, vicuna_split, has_image)
    ref_ids, ref_labels = _expand(ids, labels, 7)
    assert enc.input_ids.tolist() == ref_ids and enc.labels.tolist() == ref_labels


def test_minus_one_offset_masks_everything_when_the_counts_are_equal():
    tok = SlowLlama(_train_sp(), legacy=False)
    assert len(tok.sp.encode("USER")) == len(_after_eos(tok)) == 2  # ▁US ER vs US ER
    has_image, conv = CONVS["image-3"]
    assert ref_preprocess_v1(conv, tok, has_image)[2]  # mismatch: LLaVA masks the whole sample


@pytest.mark.parametrize("caption", [" A red square.", "\nA red square.", "  A red", "A red square."])
def test_plain_caption_with_leading_whitespace(llama_toks, caption):
    """LLaVA keeps a caption's leading whitespace (only turns holding <image> are stripped); so do we."""
    conv = [("human", "<image>"), ("gpt", caption)]
    for name, tok in llama_toks.items():
        enc = _ours(plain(), conv, tok, True)
        ids, labels = _expand(*ref_preprocess_plain(conv, tok), 7)
        assert enc.input_ids.tolist() == ids and enc.labels.tolist() == labels, name
