"""Token streams of the templates against an independent re-implementation of
LLaVA's preprocessing (llava/train/train.py ``preprocess_multimodal``,
``preprocess_plain``, ``preprocess_v1``; llava/mm_utils.py
``tokenizer_image_token``; llava/conversation.py ``conv_vicuna_v1``) written
here from LLaVA's code, on a Llama-style SentencePiece tokenizer trained in
the test: the Hugging Face class (tokenizers backend) and a slow tokenizer
applying the pre-v5 slow ``LlamaTokenizer`` rules on the SentencePiece model
itself, each legacy and not.  chatml against ``apply_chat_template`` of a
Qwen2-style tokenizer (Qwen2's chat template)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from asvr.train.data.templates import (
    IGNORE_INDEX,
    ConversationError,
    chatml,
    encode_conversation,
    encode_generation_prompt,
    plain,
    validate_turns,
    vicuna_v1,
)

spm = pytest.importorskip("sentencepiece")
HW = 5
IMG = -200
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CONVS = {
    "image-1": (True, [("human", "What is in the picture?\n<image>"), ("gpt", "A red square on a blue background.")]),
    "image-3": (
        True,
        [
            ("human", "<image>\nHow many dogs?"),
            ("gpt", "3 dogs."),
            ("human", "And cats?"),
            ("gpt", "There are 12 cats.\nNo birds."),
            ("human", "Colour of the square?"),
            ("gpt", "red"),
        ],
    ),
    "image-mid": (True, [("human", "Look at this: <image> What is it? "), ("gpt", "A square.")]),
    "text-1": (False, [("human", "Say hello."), ("gpt", "Hello there, user.")]),
    "text-2": (False, [("human", "Count to 3."), ("gpt", "1 2 3"), ("human", "Now the colour?"), ("gpt", "blue")]),
}
TRAIN_TEXT = [
    SYSTEM,
    "USER: What is in the picture? ASSISTANT: A red square on a blue background.",
    "How many dogs? 3 dogs. And cats? There are 12 cats. No birds. Colour of the square? red",
    "Look at this: What is it? A square. Say hello. Hello there, user. Count to 3. Now the colour? blue",
]


# ------------------------------------------------------------------ tokenizers
def _train_sp(user_symbols=()) -> bytes:
    m = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT * 20),
        model_writer=m,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        user_defined_symbols=list(user_symbols),
    )
    return m.getvalue()


class SlowLlama:
    """The pre-v5 slow ``LlamaTokenizer`` rules on the SentencePiece model: the text is split at
    ``<s>``/``</s>``; each piece gets SentencePiece's dummy prefix when legacy, else only the first."""

    bos_token, eos_token, bos_token_id, eos_token_id, pad_token_id = "<s>", "</s>", 1, 2, None

    def __init__(self, proto: bytes, legacy: bool):
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.legacy = legacy

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.bos_token_id] if add_special_tokens else []
        for j, piece in enumerate(re.split(r"(<s>|</s>)", text)):
            if piece in ("<s>", "</s>"):
                ids.append(self.sp.piece_to_id(piece))
            elif piece and (self.legacy or j == 0):
                ids += self.sp.encode(piece)
            elif piece:  # the slow tokenizer's trick: encode after '<unk>' and drop its pieces
                ids += self.sp.encode("<unk>" + piece)[len(self.sp.encode("<unk>")) :]
        return {"input_ids": ids}

    def decode(self, ids) -> str:
        return "".join(
            "</s>"
            if i == 2
            else self.sp.decode([int(i)])
            if self.sp.id_to_piece(int(i))[0] != "▁"
            else " " + self.sp.decode([int(i)])
            for i in ids
        )


@pytest.fixture(scope="module")
def sp_proto() -> bytes:
    return _train_sp()


@pytest.fixture(scope="module")
def toks(sp_proto, tmp_path_factory):
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("llama_tok")
    (d / "tokenizer.model").write_bytes(sp_proto)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    out = {}
    for legacy in (True, False):
        out[f"hf-legacy={legacy}"] = LlamaTokenizer.from_pretrained(d, legacy=legacy)
        out[f"slow-legacy={legacy}"] = SlowLlama(sp_proto, legacy)
    return out


# ------------------------------------------------------------------ LLaVA, re-implemented
def ref_tokenizer_image_token(prompt, tok):
    chunks = [tok(c)["input_ids"] for c in prompt.split("<image>")]

    def insert_separator(xs, sep):
        return [e for pair in zip(xs, [sep] * len(xs)) for e in pair][:-1]

    ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for x in insert_separator(chunks, [IMG] * (offset + 1)):
        ids.extend(x[offset:])
    return ids


def ref_preprocess_multimodal(conv):
    out = []
    for frm, value in conv:
        if "<image>" in value:
            value = value.replace("<image>", "").strip()
            value = ("<image>" + "\n" + value).strip()
        out.append((frm, value))
    return out


def ref_preprocess_v1(conv, tok, has_image):
    """-> (input_ids, labels, mismatch) as LLaVA's preprocess_v1 (one sample, no padding)."""
    if has_image:
        conv = ref_preprocess_multimodal(conv)
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    prompt = SYSTEM + seps[0]
    for i, (frm, msg) in enumerate(conv):
        prompt += roles[frm] + ": " + msg + seps[i % 2]
    ids = ref_tokenizer_image_token(prompt, tok) if has_image else tok(prompt)["input_ids"]
    target = list(ids)
    total_len = len(target)
    sep = " " + "ASSISTANT" + ": "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        n = (lambda s: len(ref_tokenizer_image_token(s, tok))) if has_image else (lambda s: len(tok(s)["input_ids"]))
        round_len = n(rou)
        instruction_len = n(parts[0]) - 2
        if i != 0 and not tok.legacy:  # IS_TOKENIZER_GREATER_THAN_0_14
            round_len -= 1
            instruction_len -= 1
        for k in range(cur_len, min(cur_len + instruction_len, len(target))):
            target[k] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    mismatch = cur_len != total_len
    if mismatch:
        target = [IGNORE_INDEX] * len(target)
    return ids, target, mismatch


def ref_preprocess_plain(conv, tok):
    conv = ref_preprocess_multimodal(conv)
    assert len(conv) == 2 and "<image>" in conv[0][1]
    prompt = "<image>" + conv[1][1] + "\n"
    ids = ref_tokenizer_image_token(prompt, tok)
    target = list(ids)
    n = len(ref_tokenizer_image_token("<image>", tok))
    target[:n] = [IGNORE_INDEX] * n
    return ids, target


def _expand(ids, labels, image_id):
    out_ids, out_lab = [], []
    for i, l in zip(ids, labels):
        out_ids += [image_id] * HW if i == IMG else [i]
        out_lab += [IGNORE_INDEX] * HW if i == IMG else [l]
    return out_ids, out_lab


def _turns(conv):
    return [{"from": f, "value": v} for f, v in conv]


def _ours(template, conv, tok, has_image):
    return encode_conversation(template, validate_turns(_turns(conv), has_image), tok, HW, image_id=7)


def _trained_spans(enc):
    t = np.concatenate([[False], enc.trained, [False]]).astype(int)
    starts, ends = np.flatnonzero(np.diff(t) == 1), np.flatnonzero(np.diff(t) == -1)
    return [enc.input_ids[a:b].tolist() for a, b in zip(starts, ends)]


# ------------------------------------------------------------------ tests
def test_tokenizers_agree(toks):
    """The two implementations of the Llama rules give one stream (so either is a fair reference)."""
    s = SYSTEM + " USER: Count to 3. ASSISTANT: 1 2 3</s>USER: Now the colour? ASSISTANT: blue</s>"
    for legacy in (True, False):
        assert toks[f"hf-legacy={legacy}"](s)["input_ids"] == toks[f"slow-legacy={legacy}"](s)["input_ids"]
    assert toks["hf-legacy=True"](s)["input_ids"] != toks["hf-legacy=False"](s)["input_ids"]


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("tk", ["hf-legacy=True", "hf-legacy=False", "slow-legacy=True", "slow-legacy=False"])
def test_vicuna_v1_equals_llava_preprocess_v1(toks, tk, name):
    tok = toks[tk]
    has_image, conv = CONVS[name]
    enc = _ours(vicuna_v1(), conv, tok, has_image)
    ids, labels, mismatch = ref_preprocess_v1(conv, tok, has_image)
    ref_ids, ref_labels = _expand(ids, labels, 7)
    assert enc.input_ids.tolist() == ref_ids  # the stream is LLaVA's, always
    assert enc.image_mask.sum() == (HW if has_image else 0)
    n_rounds = len(conv) // 2
    # LLaVA's round arithmetic holds for legacy tokenizers and for one round; with a non-legacy
    # tokenizer a later round starts 'US','ER' where the isolated round has '▁USER', and LLaVA's
    # -1 offset goes the wrong way: it masks the whole sample ("tokenization mismatch")
    assert mismatch == (tk.endswith("False") and n_rounds > 1)
    if not mismatch:
        assert enc.labels.tolist() == ref_labels
    else:  # ours are still exact: each trained span is one answer + </s>
        spans = _trained_spans(enc)
        answers = [v for f, v in conv if f == "gpt"]
        assert len(spans) == len(answers)
        for span, a in zip(spans, answers):
            assert span[-1] == tok.eos_token_id
            assert toks["slow-legacy=True"].decode(span) == " " + a + "</s>"


@pytest.mark.parametrize("tk", ["hf-legacy=True", "hf-legacy=False", "slow-legacy=True", "slow-legacy=False"])
@pytest.mark.parametrize("name", ["image-1", "image-mid"])
def test_plain_equals_llava_preprocess_plain(toks, tk, name):
    tok = toks[tk]
    conv = CONVS[name][1]
    enc = _ours(plain(), conv, tok, True)
    ref_ids, ref_labels = _expand(*ref_preprocess_plain(conv, tok), 7)
    assert enc.input_ids.tolist() == ref_ids and enc.labels.tolist() == ref_labels
    assert enc.image_mask[1 : 1 + HW].all() and enc.trained[1 + HW :].all()


def test_old_v0_system_prompt_is_gone(toks):
    enc = _ours(vicuna_v1(), CONVS["text-1"][1], toks["hf-legacy=True"], False)
    assert enc.text.startswith(SYSTEM + " USER: Say hello. ASSISTANT: Hello")
    assert "curious human" not in vicuna_v1().system


def test_image_moves_to_the_front_and_a_missing_placeholder_drops_the_image(toks):
    tok = toks["hf-legacy=True"]
    turns = validate_turns(_turns(CONVS["image-mid"][1]), True)
    assert turns[0][1] == "<image>\nLook at this:  What is it?"
    no_ph = [("human", "What is it?"), ("gpt", "A square.")]
    enc = _ours(vicuna_v1(), no_ph, tok, True)  # LLaVA: no image token in the stream, the image unused
    ids, labels, mismatch = ref_preprocess_v1(no_ph, tok, True)
    assert not enc.image_mask.any() and enc.input_ids.tolist() == ids and enc.labels.tolist() == labels
    with pytest.raises(ConversationError, match="plain"):  # LLaVA asserts
        _ours(plain(), no_ph, tok, True)


def test_a_boundary_inside_a_token_is_a_bad_sample_not_a_silent_one(sp_proto):
    """A vocabulary with the piece ':▁' joins 'ASSISTANT:' to the answer's space.  LLaVA's
    arithmetic sees no mismatch and silently trains ': ' as the answer's first token; ours refuses."""
    tok = SlowLlama(_train_sp([":▁"]), legacy=True)
    conv = CONVS["text-1"][1]
    ids, labels, mismatch = ref_preprocess_v1(conv, tok, False)
    first = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    assert not mismatch and tok.sp.id_to_piece(ids[first]) == ":▁"
    with pytest.raises(ConversationError, match="inside a token"):
        _ours(vicuna_v1(), conv, tok, False)


def test_vicuna_generation_prompt_is_llavas_eval_prompt(toks):
    for tk in ("hf-legacy=True", "slow-legacy=False"):
        tok = toks[tk]
        enc = encode_generation_prompt(vicuna_v1(), [("user", "<image>\nWhat is it?")], tok, HW, image_id=7)
        want, _ = _expand(
            ref_tokenizer_image_token(SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:", tok), [0] * 99, 7
        )
        assert enc.input_ids.tolist() == want
        full = _ours(vicuna_v1(), [("human", "<image>\nWhat is it?"), ("gpt", "A square.")], tok, True)
        n = len(enc)  # the prompt is the training stream up to the first trained token
        assert full.input_ids[:n].tolist() == want and full.trained[n] and not full.trained[:n].any()


# ------------------------------------------------------------------ chatml vs a Qwen2 tokenizer
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


@pytest.fixture(scope="module")
def qwen_tok():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t.train_from_iterator(
        TRAIN_TEXT * 5,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        chat_template=QWEN2_CHAT_TEMPLATE,
    )


def _ids(x):
    return list(x["input_ids"]) if hasattr(x, "keys") else list(x)


@pytest.mark.parametrize("name", ["text-1", "text-2"])
def test_chatml_equals_qwen2_apply_chat_template(qwen_tok, name):
    conv = CONVS[name][1]
    msgs = [{"role": "user" if f == "human" else "assistant", "content": v} for f, v in conv]
    enc = _ours(chatml(), conv, qwen_tok, False)
    assert enc.input_ids.tolist() == _ids(qwen_tok.apply_chat_template(msgs, tokenize=True))
    assert enc.text == qwen_tok.apply_chat_template(msgs, tokenize=False)
    spans = _trained_spans(enc)
    assert [qwen_tok.decode(s) for s in spans] == [
        m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"
    ]
    gen = encode_generation_prompt(
        chatml(), validate_turns(_turns(conv[:-1] + [("gpt", "x")]), False)[:-1], qwen_tok, HW
    )
    assert gen.input_ids.tolist() == _ids(
        qwen_tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
    )


def test_chatml_image_chunks(qwen_tok):
    conv = CONVS["image-1"][1]
    enc = _ours(chatml(), conv, qwen_tok, True)
    text = enc.text
    a, b = text.split("<image>")
    want = (
        qwen_tok(a, add_special_tokens=False)["input_ids"]
        + [7] * HW
        + qwen_tok(b, add_special_tokens=False)["input_ids"]
    )
    assert enc.input_ids.tolist() == want and enc.image_mask.sum() == HW
    assert "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>" in text
