"""``--template chatml_asvr``: chatml's ids with ASVR's ``preprocess_qwen`` labels, against
ASVR's function re-implemented here from its ``train.py`` (each message through its own
chat template ``<|im_start|>role\\ncontent<|im_end|>\\n``, the system message first, user
and system masked, assistant messages whole, then every ``\\n`` / ``<|im_start|>`` /
``<|im_end|>`` id trained, ``<image>`` a special token replaced by -200), on a byte-level
BPE tokenizer with Qwen2's special tokens built here."""

from __future__ import annotations

import copy

import pytest

from asvr.train.data.templates import chatml, chatml_asvr, encode_conversation, get_template, validate_turns

HW = 4
ASVR_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVS = {
    "image-1": (True, [("human", "<image>\nWhat is in the picture?"), ("gpt", "A red square.\nNothing else.")]),
    "image-3": (
        True,
        [
            ("human", "<image>\nHow many dogs?"),
            ("gpt", "3 dogs."),
            ("human", "And cats?\nCount them."),
            ("gpt", "12"),
            ("human", "Colour?"),
            ("gpt", "red"),
        ],
    ),
    "text-2": (False, [("human", "Count to 3."), ("gpt", "1 2 3"), ("human", "Again"), ("gpt", "1\n2\n3")]),
}


@pytest.fixture(scope="module")
def qwen_like():
    from asvr.demo.tiny_llm import train_bpe_tokenizer

    texts = [t for _, conv in CONVS.values() for _, t in conv] + ["You are a helpful assistant. system user assistant"]
    return train_bpe_tokenizer(texts * 5, vocab_size=400)


def ref_preprocess_qwen(conv, tok, has_image):
    """ASVR train.py preprocess_qwen (one sample), with the tokenizer's ids for its hard-coded
    Qwen2 ids (198 = '\\n', 151644 = <|im_start|>, 151645 = <|im_end|>)."""
    roles = {"human": "user", "gpt": "assistant"}
    tok = copy.deepcopy(tok)
    if has_image:
        tok.add_tokens(["<image>"], special_tokens=True)
    image_token_index = tok.convert_tokens_to_ids("<image>")
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    unmask = [tok("\n", add_special_tokens=False)["input_ids"][0], im_start, im_end]

    def apply(messages):
        text = tok.apply_chat_template(messages, chat_template=ASVR_TEMPLATE, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    if roles[conv[0][0]] != roles["human"]:
        conv = conv[1:]
    input_id = apply([{"role": "system", "content": "You are a helpful assistant."}])
    target = [-100] * len(input_id)
    for frm, value in conv:
        role = roles[frm]
        enc = apply([{"role": role, "content": value}])
        input_id += enc
        target += [-100] * len(enc) if role in ("user", "system") else enc
    for i, t in enumerate(input_id):
        if t in unmask:
            target[i] = t
        if t == image_token_index:
            input_id[i] = -200
    return input_id, target


def _expand(ids, target, image_id):
    out_ids, out_t = [], []
    for i, t in zip(ids, target):
        if i == -200:
            out_ids += [image_id] * HW
            out_t += [-100] * HW
        else:
            out_ids.append(i)
            out_t.append(t)
    return out_ids, out_t


@pytest.mark.parametrize("name", list(CONVS))
def test_chatml_asvr_equals_asvr_preprocess_qwen(qwen_like, name):
    has_image, conv = CONVS[name]
    turns = validate_turns([{"from": f, "value": v} for f, v in conv], has_image)
    ours = encode_conversation(chatml_asvr(), turns, qwen_like, HW, image_id=0)
    want_ids, want_labels = _expand(*ref_preprocess_qwen(conv, qwen_like, has_image), image_id=0)
    assert ours.input_ids.tolist() == want_ids
    assert ours.labels.tolist() == want_labels
    # the default chatml: the same ids, fewer trained tokens (each answer + <|im_end|> only)
    ref = encode_conversation(chatml(), turns, qwen_like, HW, image_id=0)
    assert ref.input_ids.tolist() == want_ids
    assert ref.trained.sum() < ours.trained.sum()
    assert not (ref.trained & ~ours.trained).any()  # ASVR trains a superset


def test_chatml_asvr_is_a_template_choice():
    from asvr.train.config import TrainConfig

    assert get_template("chatml_asvr").labels == "asvr_qwen"
    assert "chatml_asvr" in TrainConfig.__dataclass_fields__["template"].metadata.get("choices", ())
    with pytest.raises(ValueError, match="chatml only"):
        from asvr.train.data.templates import ConversationTemplate

        ConversationTemplate(name="x", style="two", labels="asvr_qwen")
