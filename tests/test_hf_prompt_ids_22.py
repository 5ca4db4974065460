"""``asvr-export --hf-llava``: the exported processor's ids equal the training stream's, for
every template (plain, vicuna_v1, chatml) and for three tokenizers built here: a byte-level
BPE and a Llama SentencePiece tokenizer, ``legacy=True`` and ``legacy=False``, whose
vocabulary splits " USER" in two pieces (``▁US`` ``ER``, as Vicuna's).

The reference is LLaVA's rules written in this file (``conv_vicuna_v1.get_prompt``,
``preprocess_plain``, ``preprocess_multimodal``, ``tokenizer_image_token``; chatml as Qwen2's
template), applied with the tokenizer the run trained with; the other side is transformers'
own ``AutoProcessor`` (``LlavaProcessor``) loaded from the exported folder.  Nothing of this
project computes the expected ids.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

spm = pytest.importorskip("sentencepiece")

TINY_SIGLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
IMAGE_TOKENS = 16  # the 4x4 grid
IMG = -200
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SP_TEXT = [
    SYSTEM,
    "the US and the USA ERA ERROR WATER US US BUS ER ERR OVER UNDER USB",
    "ASSISTANT: a red square. What is in the picture? And the colour?",
    "Say hello. Hello there. Again? Blue. A cat on a mat. What colour is it? How many dogs? 3 dogs.",
]
TEMPLATES = ("plain", "vicuna_v1", "chatml")
TOKENIZERS = ("bpe", "spm-legacy", "spm")
# (turns ending with a question); the user turn holding the image is marked by IMAGE
IMAGE = object()
CONVERSATIONS = {
    "one-turn": [(IMAGE, "What colour is it?")],
    "multi-turn": [(IMAGE, "How many dogs?"), ("gpt", "3 dogs."), ("human", "And cats? USER said two.")],
    "text-only": [("human", "Say hello."), ("gpt", "Hello there."), ("human", "Again?")],
}


# ------------------------------------------------------------------ LLaVA's rules, re-implemented
def llava_prompt(template: str, conv) -> str:
    """The generation prompt string (the image as ``<image>\\n`` + question: preprocess_multimodal)."""
    turns = [("human", "<image>\n" + t) if r is IMAGE else (r, t) for r, t in conv]
    if template == "plain":  # preprocess_plain: the question becomes just <image>; the caption follows
        return "<image>"
    if template == "vicuna_v1":  # SeparatorStyle.TWO, sep " ", sep2 "</s>", then "ASSISTANT:" (no message)
        s = SYSTEM + " "
        for i, (r, t) in enumerate(turns):
            s += ("USER" if r == "human" else "ASSISTANT") + ": " + t + (" " if i % 2 == 0 else "</s>")
        return s + "ASSISTANT:"
    s = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for r, t in turns:
        s += f"<|im_start|>{'user' if r == 'human' else 'assistant'}\n{t}<|im_end|>\n"
    return s + "<|im_start|>assistant\n"


def llava_tokenizer_image_token(prompt: str, tok, special: bool) -> list[int]:
    chunks = [tok(c, add_special_tokens=special)["input_ids"] for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    seps = [e for pair in zip(chunks, [[IMG] * (offset + 1)] * len(chunks)) for e in pair][:-1]
    for x in seps:
        ids.extend(x[offset:])
    return ids


def reference_ids(template: str, conv, tok, image_id: int) -> list[int]:
    ids = llava_tokenizer_image_token(llava_prompt(template, conv), tok, special=template != "chatml")
    return [x for t in ids for x in ([image_id] * IMAGE_TOKENS if t == IMG else [t])]


def hf_messages(conv) -> list[dict]:
    out = []
    for r, t in conv:
        if r is IMAGE:
            out.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]})
        elif r == "human":
            out.append({"role": "user", "content": [{"type": "text", "text": t}]})
        else:
            out.append({"role": "assistant", "content": t})
    return out


# ------------------------------------------------------------------ tiny tokenizers, model, runs
def _sp_tokenizer(folder: Path, legacy: bool):
    from transformers import LlamaTokenizer

    m = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT * 20),
        model_writer=m,
        vocab_size=400,
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
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(m.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": legacy})
    )
    return LlamaTokenizer.from_pretrained(folder, legacy=legacy)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer, SiglipVisionConfig, SiglipVisionModel

    from asvr.tokenizer.model import SemanticTokenizer

    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

    from asvr.tokenizer.encoders.base import default_encoder_spec
    from asvr.train.config import ModelConfig, VisualHeadConfig
    from asvr.train.export.native import TrainedInputs, save_exported
    from asvr.train.model.lvlm import build_model
    from asvr.demo.tiny_llm import make_tiny_llm

    root = tmp_path_factory.mktemp("hfprompt")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(root / "siglip")
    llm = make_tiny_llm(root / "llm", "llama", SP_TEXT, vocab_size=512)
    spec = TokenizerSpec(
        encoder=default_encoder_spec("siglip", str(root / "siglip")),
        preprocess="pad",
        grid=(4, 4),
        dim=32,
        depth=2,
        codebook_size=16,
        shared_codebook=False,
    )
    save_artifact(root / "tok", spec, torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1)))
    model = build_model(
        ModelConfig(
            llm=str(llm), vision_input="online", head=VisualHeadConfig(width=64, proj_hidden=64, layers=1, head_dim=32)
        ),
        SemanticTokenizer.load(root / "tok"),
    )
    toks = {
        "bpe": AutoTokenizer.from_pretrained(llm),
        "spm-legacy": _sp_tokenizer(root / "sp_legacy", True),
        "spm": _sp_tokenizer(root / "sp", False),
    }
    runs = {}
    for tname, tok in toks.items():
        for template in TEMPLATES:
            run = root / f"run_{tname}_{template}"
            inputs = TrainedInputs(template=template, preprocess="square", image_size=32, resample="bicubic")
            save_exported(model, run / "final", tok, inputs)
            (run / "train_config.json").write_text(json.dumps({"template": template, "stage": "sft"}))
            runs[tname, template] = run
    return root, toks, runs


def _export(world, tname: str, template: str) -> Path:
    from asvr.train.export.cli import main

    root, _, runs = world
    # a fresh export per call: each test runs the export code it checks (test_hf_llava_export._export)
    out = root / f"hf_{tname}_{template}_{len(list(root.glob(f'hf_{tname}_{template}_*')))}"
    assert main([str(runs[tname, template]), "--hf-llava", str(out)]) == 0
    return out


def test_the_sentencepiece_vocabulary_is_vicunas_kind(world):
    """' USER' is two pieces (▁US ER), and the two tokenizers disagree after a special token."""
    _, toks, _ = world
    for name in ("spm", "spm-legacy"):
        tok = toks[name]
        assert tok.convert_ids_to_tokens(tok("a USER", add_special_tokens=False)["input_ids"])[-2:] == ["▁US", "ER"]
    a = toks["spm"].convert_ids_to_tokens(toks["spm"]("x</s>USER", add_special_tokens=False)["input_ids"])
    b = toks["spm-legacy"].convert_ids_to_tokens(toks["spm-legacy"]("x</s>USER", add_special_tokens=False)["input_ids"])
    assert a[-2:] == ["US", "ER"] and b[-2:] == ["▁US", "ER"]  # legacy puts ▁ after </s>


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("tname", TOKENIZERS)
def test_exported_processor_gives_the_training_ids(world, tname, template):
    from PIL import Image
    from transformers import AutoProcessor

    _, toks, _ = world
    out = _export(world, tname, template)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaProcessor"
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    convs = {"one-turn": CONVERSATIONS["one-turn"]} if template == "plain" else CONVERSATIONS
    for name, conv in convs.items():
        want = reference_ids(template, conv, toks[tname], image_id)
        prompt = processor.apply_chat_template(hf_messages(conv), add_generation_prompt=True)
        has_image = any(r is IMAGE for r, _ in conv)
        images = [Image.new("RGB", (40, 24), (10, 200, 30))] if has_image else None
        got = processor(images=images, text=prompt, return_tensors="np")["input_ids"][0].tolist()
        assert got == want, (tname, template, name)
        assert (np.asarray(got) == image_id).sum() == (IMAGE_TOKENS if has_image else 0)
    record = json.loads((out / "asvr_inputs.json").read_text())
    # legacy=False SentencePiece needs the space after <image> (the ▁ training has; plain: before its caption)
    assert record["after_image"] == (" " if tname == "spm" else "")
    assert record["template"] == template and record["preprocess"] == "square" and record["image_size"] == 32
    # the recorded training preprocessing, not the tokenizer artifact's own mode (pad)
    assert processor.image_processor.do_pad is False


def test_without_the_fix_legacy_false_is_one_token_short(world):
    """The issue's failure, reproduced on the same tokenizer: nothing after <image> drops LLaVA's ▁."""
    from PIL import Image
    from transformers import AutoProcessor

    from asvr.train.export.hf_llava import chat_template
    from asvr.train.data.templates import get_template

    root, toks, _ = world
    processor = AutoProcessor.from_pretrained(_export(world, "spm", "vicuna_v1"))
    conv = CONVERSATIONS["one-turn"]
    prompt = processor.apply_chat_template(
        hf_messages(conv), chat_template=chat_template(get_template("vicuna_v1")), add_generation_prompt=True
    )
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    got = processor(images=[Image.new("RGB", (8, 8))], text=prompt)["input_ids"][0]
    want = reference_ids("vicuna_v1", conv, toks["spm"], image_id)
    assert len(got) == len(want) - 1
    at = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
    assert at == max(i for i, t in enumerate(want) if t == image_id) + 1
    assert processor.tokenizer.convert_ids_to_tokens(want[at]) == "▁"


def test_legacy_survives_the_export(world):
    """RUN/final's text tokenizer reloads as legacy=True (transformers 5 drops it on save)."""
    from transformers import AutoTokenizer

    _, toks, runs = world
    reloaded = AutoTokenizer.from_pretrained(runs["spm-legacy", "vicuna_v1"] / "final")
    text = SYSTEM + " USER: hi ASSISTANT: yes</s>USER: again ASSISTANT:"
    assert reloaded(text)["input_ids"] == toks["spm-legacy"](text)["input_ids"]


def test_a_processor_that_prompts_differently_is_refused(world, tmp_path, capsys):
    """The LLM folder recorded in RUN/train_config.json (the training tokenizer) is SentencePiece,
    the export's tokenizer byte-level BPE: refused in one line naming the first differing token."""
    import shutil

    from asvr.train.export.cli import main

    root, _, runs = world
    run = tmp_path / "run"
    shutil.copytree(runs["bpe", "vicuna_v1"], run)
    (run / "train_config.json").write_text(
        json.dumps({"template": "vicuna_v1", "stage": "sft", "model": str(root / "sp_legacy")})
    )
    capsys.readouterr()
    assert main([str(run), "--hf-llava", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("asvr-export")]
    assert len(err) == 1 and "token 1 of" in err[0] and "vicuna_v1" in err[0], err
    assert not (tmp_path / "out").exists()
