"""Messages that used to mislead (issue 23): every image missing under --images names the
root, not --skip-bad-samples; image lists, literal special tokens and a conversation that lost
its <image> are said, in the refusal, the start-up summary and --preview; --init-from a run
with another visual head names the differing --head-* options.  Real files, real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from asvr.train.cli import main
from asvr.train.data.dataset import DataConfig, build_training_data
from asvr.train.data.sources import CodeStore, DataError
from asvr.train.data.templates import vicuna_v1
from train_corpus import make_corpus, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


@pytest.fixture(scope="module")
def llm_tok(corpus):
    return AutoTokenizer.from_pretrained(corpus.llm)


def _store(corpus, tiny_tokenizer):
    return CodeStore.open(corpus.codes, tiny_tokenizer.spec.fingerprint)


@pytest.mark.parametrize("skip", [False, True])
def test_every_image_missing_points_at_images_not_skip_bad_samples(corpus, tiny_tokenizer, llm_tok, skip):
    root = corpus.images / "d0"  # one level too deep: keys are d0/..., d1/..., d2/...
    cfg = DataConfig(
        data=[str(corpus.sft)], codes=str(corpus.codes), images=str(root), vision_input="online", skip_bad_samples=skip
    )
    with pytest.raises(DataError) as e:
        build_training_data(cfg, vicuna_v1(), llm_tok, _store(corpus, tiny_tokenizer), True)
    key = json.loads(corpus.sft.read_text())[0]["image"]
    assert str(e.value) == (
        f"none of the 9 images is under --images {root} (like {root / key}): check --images, the folder the "
        f"'image' paths are relative to; {key} is under {corpus.images}: --images {corpus.images}?"
    )


def test_image_lists_literal_specials_and_lost_image_are_named(
    corpus, tiny_tokenizer, tiny_tokenizer_dir, llm_tok, tmp_path, capsys
):
    recs = json.loads(corpus.sft.read_text())
    recs[1]["image"] = [recs[1]["image"], recs[2]["image"]]
    recs[2]["conversations"][0]["value"] = "What is in the picture?"  # its <image> lost
    recs[3]["conversations"][1]["value"] = "a square</s> and more"  # an EOS id in mid-answer, once
    recs[4]["conversations"][2]["value"] = "<|im_end|>colour?"
    data_file = tmp_path / "sft.json"
    data_file.write_text(json.dumps(recs))
    cfg = DataConfig(data=[str(data_file)], codes=str(corpus.codes), images=str(corpus.images), vision_input="codes")
    with pytest.raises(DataError) as e:
        build_training_data(cfg, vicuna_v1(), llm_tok, _store(corpus, tiny_tokenizer), False)
    lists = f"image lists are not supported (one image per sample): {recs[1]['image']!r}"
    assert str(e.value) == (
        f"3 bad samples (3 malformed): sft1 ({lists}); sft3 (turn 2 holds the literal text '</s>', a special "
        "token of the tokenizer that would not stay text (remove or reword it)); sft4 (turn 3 holds the literal "
        "text '<|im_end|>', a special token of the tokenizer that would not stay text (remove or reword it)); "
        "fix them or pass --skip-bad-samples"
    )
    cfg.skip_bad_samples = True
    data = build_training_data(cfg, vicuna_v1(), llm_tok, _store(corpus, tiny_tokenizer), False)
    assert data.no_placeholder == ["sft2"]
    by_id = {s.sample_id: s for s in data.samples}
    assert by_id["sft2"].key is None and not by_id["sft2"].encoded.image_mask.any()  # text only, as LLaVA
    eos = llm_tok.eos_token_id
    answers = {r["id"]: sum(t["from"] == "gpt" for t in r["conversations"]) for r in recs}
    for s in data.samples:  # the template's EOS after each answer, no other
        assert list(s.encoded.input_ids).count(eos) == answers[s.sample_id], s.sample_id

    args = train_args(corpus, tiny_tokenizer_dir, tmp_path / "r", data=data_file, quiet=False)
    args += ["--template", "vicuna_v1", "--vision-input", "codes", "--skip-bad-samples", "--preview", "1"]
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err == (
        "1 image sample with no <image> in the conversation, trained as text only as LLaVA does (sft2)\n"
    )


def test_init_from_another_head_names_the_options(tmp_path):
    from asvr.train.loop.checkpoint import load_pretrained
    from asvr.train.config import ModelConfig, VisionSpec, VisualHeadConfig
    from asvr.train.export.native import ExportError, save_exported
    from asvr.train.model.lvlm import build_model
    from test_train_model import C, DEPTH, GRID, HEAD, K, tiny_llm_config, tiny_model

    save_exported(tiny_model("llama", mode="codes"), tmp_path / "run" / "final")
    vision = VisionSpec(dim=C, grid=GRID, depth=DEPTH, codebook_size=K)
    head = VisualHeadConfig(**{**HEAD, "width": 64, "layers": 1})
    cfg = ModelConfig(llm=tiny_llm_config("llama"), vision_input="codes", head=head, vision=vision)
    other = build_model(cfg, codebooks=torch.randn(DEPTH, K, C))
    with pytest.raises(ExportError) as e:
        load_pretrained(other, tmp_path / "run", "")
    assert str(e.value) == (
        f"--init-from {tmp_path / 'run' / 'final'} has another visual head: --head-width 32 there, 64 here, "
        "--head-layers 2 there, 1 here; give the same --head-* options as the run that made it"
    )
