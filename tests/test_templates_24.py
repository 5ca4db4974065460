"""Labels stay exact when an answer itself holds the template's end marker (issue 24).

An answer such as ``"Type </s> to end."`` (vicuna_v1's marker) or ``"... <|im_end|> ..."``
(chatml's) puts a marker token inside the answer, where a shortcut that looks for "the
first marker after the answer's start" ends the answer early.  Two independent references:

* vicuna_v1: LLaVA's ``preprocess_v1`` arithmetic (re-implemented in
  ``test_train_templates.py``), with one change: the rounds are taken from the turns
  instead of ``prompt.split("</s>")`` (LLaVA's own split cuts such an answer in two and
  masks the whole sample, "tokenization mismatch"; checked below).  Exact for legacy
  tokenizers, where LLaVA's arithmetic holds; for non-legacy ones each trained span must
  decode to the answer plus its marker.
* chatml: the stream of Qwen2's own chat template (``apply_chat_template``), labels built
  by hand as the concatenation of the separately tokenized pieces (the tokenizer splits at
  special tokens and at newlines, so the concatenation is the stream: asserted).

How the marker *inside* an answer is tokenized lives in :func:`_answer_text` and in the
strings of ``ROUNDS`` only: today the literal marker in the data becomes the marker token
(as LLaVA's tokenizer call does); if that changes (data text kept literal), adapt these two
places and the rest of the test stands.
"""

from __future__ import annotations

import pytest

import test_train_templates as base
from test_train_templates import SYSTEM, _ours, _trained_spans, ref_preprocess_v1, ref_tokenizer_image_token

from asvr.train.data.templates import IGNORE_INDEX, ConversationError, chatml, vicuna_v1


sp_proto, toks, qwen_tok = base.sp_proto, base.toks, base.qwen_tok  # the fixtures (module scope: built here once)

TOKENIZERS = ["hf-legacy=True", "hf-legacy=False", "slow-legacy=True", "slow-legacy=False"]


def _rounds(marker: str) -> dict[str, tuple[bool, list[tuple[str, str]]]]:
    m = marker
    return {
        "middle": (False, [("human", "How do I stop?"), ("gpt", f"Type {m} to end.")]),
        "three-rounds": (
            True,
            [
                ("human", "<image>\nWhat ends a turn?"),
                ("gpt", f"The marker {m} does."),
                ("human", "Say it twice."),
                ("gpt", f"{m} and {m} again"),
                ("human", "And at the end?"),
                ("gpt", f"It ends with {m}"),
            ],
        ),
        "question-too": (
            False,
            [
                ("human", f"Is {m} special?"),
                ("gpt", "Yes."),
                ("human", "Repeat it."),
                ("gpt", f"{m}"),
            ],
        ),
    }


# --------------------------------------------------------------------------- vicuna_v1 (</s>)
def _llava_rounds_from_turns(conv, tok, has_image):
    """LLaVA preprocess_v1's label arithmetic, rounds taken from the turns (not split at </s>)."""
    if has_image:
        conv = base.ref_preprocess_multimodal(conv)
    n = (lambda s: len(ref_tokenizer_image_token(s, tok))) if has_image else (lambda s: len(tok(s)["input_ids"]))
    prompt = SYSTEM + " "
    rounds = []
    for i in range(0, len(conv), 2):
        rou = f"USER: {conv[i][1]} ASSISTANT: {conv[i + 1][1]}"
        rounds.append((SYSTEM + " " + rou) if i == 0 else rou)
        prompt += f"USER: {conv[i][1]} ASSISTANT: {conv[i + 1][1]}</s>"
    ids = ref_tokenizer_image_token(prompt, tok) if has_image else tok(prompt)["input_ids"]
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    sep = " ASSISTANT: "
    for rou in rounds:
        head = rou[: rou.index(sep) + len(sep)]
        round_len, instruction_len = n(rou), n(head) - 2
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    assert cur == len(target)  # the arithmetic is consistent (legacy tokenizers)
    return ids, target


def _answer_text(answer: str) -> str:
    """What the trained tokens of one answer decode to: LLaVA's `` answer</s>``."""
    return " " + answer + "</s>"


@pytest.mark.parametrize("name", ["middle", "three-rounds", "question-too"])
@pytest.mark.parametrize("tk", [t for t in TOKENIZERS if t.startswith("hf")])
def test_vicuna_literal_eos_inside_a_turn_is_refused_naming_the_turn(toks, tk, name):
    """Issue 23 (item 12) chose refusal over a stream LLaVA would cut: a literal ``</s>`` in any
    turn is a one-line ``ConversationError`` naming the first such turn (1-based), never a
    trained EOS in mid-answer.  The turn number is found here from the raw conversation."""
    tok = toks[tk]
    has_image, conv = _rounds("</s>")[name]
    first = next(i for i, (_, v) in enumerate(conv) if "</s>" in v) + 1
    with pytest.raises(ConversationError) as e:
        _ours(vicuna_v1(), conv, tok, has_image)
    assert str(e.value) == (
        f"turn {first} holds the literal text '</s>', a special token of the tokenizer that would not "
        "stay text (remove or reword it)"
    )


@pytest.mark.parametrize("name", ["middle", "three-rounds", "question-too"])
@pytest.mark.parametrize("tk", [t for t in TOKENIZERS if t.startswith("slow")])
def test_vicuna_labels_exact_with_eos_inside_answers_slow_tokenizers(toks, tk, name):
    tok = toks[tk]
    has_image, conv = _rounds("</s>")[name]
    enc = _ours(vicuna_v1(), conv, tok, has_image)
    ids, _, mismatch = ref_preprocess_v1(conv, tok, has_image)
    hw = int(enc.image_mask.sum())
    assert hw == (5 if has_image else 0)
    # the stream is LLaVA's (image positions expanded)
    expanded = [t for i in ids for t in ([7] * hw if i == -200 else [i])]
    assert enc.input_ids.tolist() == expanded
    if any("</s>" in v for f, v in conv if f == "gpt"):
        assert mismatch  # LLaVA's own split at </s> cuts the answer: it masks the whole sample
    spans = _trained_spans(enc)
    answers = [v for f, v in conv if f == "gpt"]
    assert len(spans) == len(answers)  # one contiguous trained span per answer, never cut at an inner </s>
    if tk.endswith("False"):  # non-legacy: no dummy prefix after </s>, so the span decodes back exactly
        for span, a in zip(spans, answers):
            assert toks["slow-legacy=True"].decode(span) == _answer_text(a), (span, a)
    else:  # legacy: LLaVA's arithmetic with rounds from the turns, token for token
        ref_ids, ref_labels = _llava_rounds_from_turns(conv, tok, has_image)
        want = [l for i, l in zip(ref_ids, ref_labels) for l in ([IGNORE_INDEX] * hw if i == -200 else [l])]
        assert enc.labels.tolist() == want


# --------------------------------------------------------------------------- chatml (<|im_end|>)
def _chatml_by_hand(conv, tok, hw):
    """(ids, labels) as the concatenation of separately tokenized pieces; answers trained."""
    pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False)]
    for f, v in conv:
        if f == "human":
            if "<image>" in v:
                v = "<image>\n" + v.replace("<image>", "").strip()
            pieces.append((f"<|im_start|>user\n{v}<|im_end|>\n", False))
        else:
            pieces += [("<|im_start|>assistant\n", False), (v + "<|im_end|>", True), ("\n", False)]
    ids, labels = [], []
    for text, trained in pieces:
        chunks = text.split("<image>")
        for j, c in enumerate(chunks):
            if j:
                ids += [7] * hw
                labels += [IGNORE_INDEX] * hw
            t = tok(c, add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if trained else [IGNORE_INDEX] * len(t)
    return ids, labels


@pytest.mark.parametrize("name", ["middle", "three-rounds", "question-too"])
def test_chatml_literal_im_end_inside_a_turn_is_refused_naming_the_turn(qwen_tok, name):
    """As above for chatml's end marker ``<|im_end|>`` (Qwen2's tokenizer)."""
    has_image, conv = _rounds("<|im_end|>")[name]
    first = next(i for i, (_, v) in enumerate(conv) if "<|im_end|>" in v) + 1
    with pytest.raises(ConversationError) as e:
        _ours(chatml(), conv, qwen_tok, has_image)
    assert str(e.value) == (
        f"turn {first} holds the literal text '<|im_end|>', a special token of the tokenizer that would not "
        "stay text (remove or reword it)"
    )
