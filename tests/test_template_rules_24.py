"""Template rules the label tests left open (issue 24, mutation survivors of ``templates``):

* every refusal of a malformed conversation or template, by its exact one-line message;
* the answer-boundary fast path is *taken* for special-token markers (its labels equal the
  definition, a prefix tokenized the same way, while the tokenizer sees about 2x the text,
  not one prefix per boundary), including a marker that is special but not the EOS;
* the caption-free sample, ``truncated``, the generation prompt's text, the default image id;
* ``special_strings`` against a hand-listed set, ``tokenize_with_images`` against LLaVA's
  ``tokenizer_image_token`` and its no-special-tokens form built by hand.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import test_train_templates as base
from test_train_templates import HW, SYSTEM, SlowLlama, _train_sp, ref_tokenizer_image_token

from asvr.train.data.answer_tokens import IMAGE_SENTINEL, tokenize_with_images
from asvr.train.data.templates import (
    TEMPLATES,
    ConversationError,
    ConversationTemplate,
    EncodedSample,
    chatml,
    encode_conversation,
    encode_generation_prompt,
    encode_image_only,
    get_template,
    plain,
    render,
    special_strings,
    validate_turns,
    vicuna_v1,
)

sp_proto, toks, qwen_tok = base.sp_proto, base.toks, base.qwen_tok  # the fixtures (module scope)


def _t(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


# --------------------------------------------------------------------------- refusals, exact
REFUSALS = [
    ("not a list", "hi", False, "conversations is not a non-empty list"),
    ("empty", [], False, "conversations is not a non-empty list"),
    ("ends with a question", _t(("human", "q")), False, "the last turn is not an answer"),
    (
        "ends with a question (3)",
        _t(("human", "q"), ("gpt", "a"), ("human", "q2")),
        False,
        "the last turn is not an answer",
    ),
    ("image in an answer", _t(("human", "<image>\nq"), ("gpt", "see <image>")), True, "<image> inside an answer"),
    (
        "two images",
        _t(("human", "<image> and <image>"), ("gpt", "a")),
        True,
        "2 <image> placeholders (one image per sample)",
    ),
    ("image, none given", _t(("human", "<image>\nq"), ("gpt", "a")), False, "<image> placeholder but no image"),
    ("turn not a dict", ["q", {"from": "gpt", "value": "a"}], False, "turn 0 is not {from, value: str}"),
    (
        "value not a string",
        [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}],
        False,
        "turn 0 is not {from, value: str}",
    ),
    ("no from", [{"value": "q"}, {"from": "gpt", "value": "a"}], False, "turn 0 is not {from, value: str}"),
    ("unknown role", _t(("system", "q"), ("gpt", "a")), False, "turn 0 is from 'system', not human/gpt"),
    ("starts with an answer", _t(("gpt", "a"), ("human", "q")), False, "turn 0 breaks the human/gpt alternation"),
    ("empty answer", _t(("human", "q"), ("gpt", "")), False, "turn 1 is empty"),
]


@pytest.mark.parametrize("name,turns,has_image,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_malformed_conversations_are_refused_with_their_message(name, turns, has_image, message):
    with pytest.raises(ConversationError) as e:
        validate_turns(turns, has_image)
    assert str(e.value) == message


def test_plain_refuses_anything_but_an_image_question_and_one_answer(toks):
    tok = toks["hf-legacy=True"]
    for turns in (
        [("user", "<image>\nq"), ("assistant", "a"), ("user", "q"), ("assistant", "b")],
        [("user", "q"), ("assistant", "a")],
    ):
        with pytest.raises(ConversationError) as e:
            encode_conversation(plain(), turns, tok, HW)
        assert str(e.value) == "the plain template needs one question holding <image> and one answer"
    # a generation prompt is one question: "<image>" alone (LLaVA's plain eval prompt)
    gen = encode_generation_prompt(plain(), [("user", "<image>\nWhat is it?")], tok, HW, image_id=7)
    assert gen.text == "<image>" and gen.input_ids.tolist() == [tok.bos_token_id] + [7] * HW


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"style": "fancy"}, "template style must be one of ('plain', 'two', 'chatml'), got 'fancy'"),
        (
            {"style": "two", "labels": "everything"},
            "template labels must be one of ('answers', 'asvr_qwen') (asvr_qwen: chatml only), got 'everything'",
        ),
        (
            {"style": "two", "labels": "asvr_qwen"},
            "template labels must be one of ('answers', 'asvr_qwen') (asvr_qwen: chatml only), got 'asvr_qwen'",
        ),
    ],
)
def test_a_template_that_cannot_work_is_refused(kw, message):
    with pytest.raises(ValueError) as e:
        ConversationTemplate(name="t", **kw)
    assert str(e.value) == message
    ConversationTemplate(name="t", style="chatml", labels="asvr_qwen")  # the one place asvr_qwen is allowed


def test_templates_by_name_and_an_unknown_name():
    for name in ("plain", "vicuna_v1", "chatml", "chatml_asvr"):
        assert get_template(name).name == name
    with pytest.raises(ValueError) as e:
        get_template("llama3")
    assert str(e.value) == f"unknown template 'llama3'; one of {sorted(TEMPLATES)}"


def test_answer_markers_and_a_tokenizer_without_eos(toks, qwen_tok):
    tok = toks["hf-legacy=True"]
    assert plain().answer_end(tok) == "\n"
    assert vicuna_v1().answer_end(tok) == "</s>"
    assert chatml().answer_end(qwen_tok) == "<|im_end|>"
    no_eos = SlowLlama(toks["slow-legacy=True"].sp.serialized_model_proto(), legacy=True)
    no_eos.eos_token = None
    with pytest.raises(ConversationError) as e:
        vicuna_v1().answer_end(no_eos)
    assert str(e.value) == "template vicuna_v1 ends answers with the EOS token; the tokenizer has none"


@pytest.mark.parametrize("system", ["", "Be brief and kind."])
def test_a_boundary_inside_a_token_names_the_text_around_it(system):
    """The window is 12 characters either side, newlines written as \\n, cut at the text's start."""
    tok = SlowLlama(_train_sp([":▁"]), legacy=True)  # ':▁' joins "A:" to the answer's leading space
    tpl = ConversationTemplate(name="t", style="two", system=system, roles=("U", "A"), sep="\n", sep2=None)
    turns = [("user", "Hi"), ("assistant", "Fine thanks")]
    text, spans = render(tpl, turns, tok)
    at = spans[0][0]
    assert (at < 12) == (not system)  # with no system prompt the window's left edge is the text's start
    near = text[max(0, at - 12) : at + 12].replace("\n", "\\n")
    with pytest.raises(ConversationError) as e:
        encode_conversation(tpl, turns, tok, HW)
    assert str(e.value) == (
        f"an answer boundary falls inside a token (near {near!r}): its labels cannot be computed exactly"
    )


# --------------------------------------------------------------------------- the fast path
class CountingTokenizer:
    """A tokenizer that counts the characters it is asked to tokenize (everything else delegated)."""

    def __init__(self, tok):
        self._tok, self.chars = tok, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _by_definition(template, turns, tok):
    """Trained mask by the boundary's definition: each boundary is the token count of the text
    before it, tokenized as the stream (LLaVA's tokenizer_image_token); an answer runs to the end."""
    text, spans = render(template, turns, tok)
    n = (
        (lambda s: len(ref_tokenizer_image_token(s, tok)))
        if template.add_special_tokens
        else (lambda s: len(tokenize_with_images(s, tok, False)))
    )
    total = n(text)
    trained = np.zeros(total, bool)
    for s, e in spans:
        trained[n(text[:s]) : total if e == len(text) else n(text[:e])] = True
    return text, trained


ROUNDS = [("user", "<image>\nWhat is on the left?")] + [
    x for i in range(6) for x in (("assistant", f"A cat number {i}, sitting."), ("user", f"And then {i}?"))
][:-1]


def _eos_is_endoftext(qwen_tok):
    t = copy.deepcopy(qwen_tok)
    t.eos_token = "<|endoftext|>"
    assert t.eos_token == "<|endoftext|>" and "<|im_end|>" in t.all_special_tokens
    return t


@pytest.mark.parametrize(
    "tpl,tk",
    [
        ("vicuna_v1", "hf-legacy=True"),
        ("vicuna_v1", "hf-legacy=False"),
        ("vicuna_v1", "slow-legacy=True"),  # no all_special_tokens: the EOS alone is known special
        ("chatml", "qwen"),
        ("chatml", "qwen-eos-endoftext"),  # <|im_end|> special but not the EOS (a base model's tokenizer)
    ],
)
def test_special_marker_answers_take_the_fast_path_with_exact_labels(toks, qwen_tok, tpl, tk):
    raw = {
        "qwen": qwen_tok,
        "qwen-eos-endoftext": _eos_is_endoftext(qwen_tok) if tk.endswith("endoftext") else None,
    }.get(tk) or toks[tk]
    template = get_template(tpl)
    text, want = _by_definition(template, ROUNDS, raw)
    tok = CountingTokenizer(raw)
    enc = encode_conversation(template, ROUNDS, tok, HW, image_id=5)
    got = enc.trained[~enc.image_mask]
    assert (
        got.tolist()
        == want[
            np.asarray(
                ref_tokenizer_image_token(text, raw)
                if template.add_special_tokens
                else tokenize_with_images(text, raw, False)
            )
            != IMAGE_SENTINEL
        ].tolist()
    )
    # the stream once, the first answer's prefix, then only the text between answers: < 2.5x the
    # text (a prefix per boundary is about 1 + 11 answers' boundaries / 2 = 6.5x here)
    assert len(text) <= tok.chars < 2.5 * len(text), (tok.chars, len(text))


# --------------------------------------------------------------------------- small pieces
def test_caption_free_sample_is_bos_and_the_image_positions(toks, qwen_tok):
    llama = toks["hf-legacy=True"]
    enc = encode_image_only(vicuna_v1(), llama, HW)
    assert llama.pad_token_id is None  # the image id falls back to 0
    assert enc.input_ids.tolist() == [llama.bos_token_id] + [0] * HW
    assert enc.image_mask.tolist() == [False] + [True] * HW
    assert not enc.trained.any() and enc.text == "<image>"
    q = encode_image_only(chatml(), qwen_tok, HW)  # no BOS; the pad id fills the image positions
    assert q.input_ids.tolist() == [qwen_tok.pad_token_id] * HW and q.image_mask.all() and not q.trained.any()
    assert encode_image_only(chatml(), qwen_tok, HW, image_id=9).input_ids.tolist() == [9] * HW
    # the template decides about BOS, not the tokenizer: chatml adds none even where <s> exists
    assert encode_image_only(chatml(), llama, HW).input_ids.tolist() == [0] * HW


def test_default_image_id_is_the_pad_id(qwen_tok):
    tok = copy.deepcopy(qwen_tok)
    tok.pad_token = "<|im_end|>"  # a pad id other than the fallback 0
    turns = [("user", "<image>\nWhat?"), ("assistant", "A cat.")]
    enc = encode_conversation(chatml(), turns, tok, HW)
    assert tok.pad_token_id == 2
    assert enc.input_ids[enc.image_mask].tolist() == [2] * HW


def test_truncated_cuts_every_field_and_keeps_the_text():
    s = EncodedSample(
        np.arange(6, dtype=np.int32), np.array([0, 1, 1, 0, 1, 1], bool), np.array([1, 0, 0, 0, 0, 0], bool), "t"
    )
    c = s.truncated(4)
    assert c.input_ids.tolist() == [0, 1, 2, 3] and c.trained.tolist() == [False, True, True, False]
    assert c.image_mask.tolist() == [True, False, False, False] and c.text == "t"


def test_chatml_adds_no_bos_and_an_empty_system_prompt_is_left_out(toks):
    llama = toks["hf-legacy=True"]  # a tokenizer that would add <s> if asked
    turns = [("user", "Hi"), ("assistant", "Fine")]
    enc = encode_conversation(chatml(), turns, llama, HW)
    assert enc.input_ids[0] != llama.bos_token_id
    assert encode_generation_prompt(chatml(), turns[:1], llama, HW).input_ids[0] != llama.bos_token_id
    bare = ConversationTemplate(name="c", style="chatml", roles=("user", "assistant"), add_special_tokens=False)
    text, _ = render(bare, turns, llama)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nFine<|im_end|>\n"


def test_generation_prompt_keeps_its_text(toks):
    tok = toks["hf-legacy=True"]
    enc = encode_generation_prompt(vicuna_v1(), [("user", "Why?")], tok, HW)
    assert enc.text == f"{SYSTEM} USER: Why? ASSISTANT:"


class _Added:
    def __init__(self, content, special=None):
        self.content = content
        if special is not None:
            self.special = special

    def __str__(self):
        return self.content


class _DuckTokenizer:
    all_special_tokens = ["</s>", "<s>", ""]
    added_tokens_decoder = {
        5: _Added("<x>", True),
        6: _Added("<y>", False),
        7: _Added("<image>", True),
        8: _Added("<no-flag>"),
    }


def test_special_strings_against_a_hand_listed_set(qwen_tok):
    assert special_strings(_DuckTokenizer()) == ["</s>", "<s>", "<x>"]
    only_decoder = _DuckTokenizer()
    only_decoder.all_special_tokens = []
    assert special_strings(only_decoder) == ["<x>"]
    assert special_strings(object()) == []
    assert special_strings(qwen_tok) == ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]


def test_tokenize_with_images_with_and_without_special_tokens(toks):
    tok = toks["hf-legacy=True"]
    text = "Look: <image>\nWhat is it?"
    assert tokenize_with_images(text, tok) == ref_tokenizer_image_token(text, tok)  # the default: with BOS
    a, b = text.split("<image>")
    want = (
        tok(a, add_special_tokens=False)["input_ids"] + [IMAGE_SENTINEL] + tok(b, add_special_tokens=False)["input_ids"]
    )
    assert tokenize_with_images(text, tok, add_special_tokens=False) == want
    # a text that starts with the image: an empty first chunk
    lead = "<image>\nWhat?"
    assert (
        tokenize_with_images(lead, tok, add_special_tokens=False)
        == [IMAGE_SENTINEL] + tok("\nWhat?", add_special_tokens=False)["input_ids"]
    )
