"""The export records how the model was trained to read its inputs (template, preprocessing,
image size), and every reader uses the record unless told otherwise and says so.

A tiny codes-input model (real EfficientNet-Lite0 tokenizer of conftest, whose own mode is
``square``) is exported as trained with ``chatml`` and ``pad``, while its run's
``train_config.json`` still says ``vicuna_v1``: the record wins, an override beats the
record, and an export without the record falls back to the old sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asvr.train.config import ModelConfig, VisualHeadConfig
from asvr.train.export.native import TrainedInputs, save_exported
from asvr.train.model.lvlm import build_model
from train_corpus import make_corpus

HEAD = VisualHeadConfig(width=64, proj_hidden=64, layers=1, head_dim=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("ticorpus"), tiny_tokenizer, n_images=4, n_captioned=3)


def _run(root: Path, corpus, tokenizer, inputs: TrainedInputs | None) -> Path:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(llm=str(corpus.llm), vision_input="codes", head=HEAD), tokenizer)
    run = root / ("run_recorded" if inputs else "run_old")
    save_exported(model, run / "final", AutoTokenizer.from_pretrained(corpus.llm), inputs)
    cfg = {"template": "vicuna_v1", "stage": "sft", "codes": str(corpus.codes)}
    (run / "train_config.json").write_text(json.dumps(cfg))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tiruns")
    rec = TrainedInputs(template="chatml", preprocess="pad", image_size=224, resample="bicubic")
    return _run(root, corpus, tiny_tokenizer, rec), _run(root, corpus, tiny_tokenizer, None)


def test_the_record_is_in_asvr_config(runs, tiny_tokenizer):
    from asvr.train.export.native import read_inputs

    recorded, old = runs
    meta = json.loads((recorded / "final" / "asvr_config.json").read_text())
    assert meta["inputs"] == {"template": "chatml", "preprocess": "pad", "image_size": 224, "resample": "bicubic"}
    assert read_inputs(recorded / "final") == TrainedInputs(**meta["inputs"])
    assert read_inputs(old / "final") is None
    assert tiny_tokenizer.spec.preprocess == "square"  # the record is not the tokenizer's mode


def test_load_for_eval_uses_the_record_unless_told_otherwise(runs, corpus):
    from asvr.eval.generate import VisionEncoder
    from asvr.eval.loading import load_for_eval

    recorded, old = runs
    lm = load_for_eval(recorded, device="cpu", need_encoder=True)
    assert (lm.template.name, lm.preprocess) == ("chatml", "pad")
    assert "asvr_config.json" in lm.template_source and "asvr_config.json" in lm.preprocess_source
    assert VisionEncoder(lm).mode == "pad"
    lm = load_for_eval(recorded, device="cpu", template="vicuna_v1")
    assert (lm.template.name, lm.template_source) == ("vicuna_v1", "--template")
    lm = load_for_eval(old, device="cpu")  # an export written before the record: the old sources
    assert (lm.template.name, lm.preprocess) == ("vicuna_v1", "square")
    assert lm.template_source.endswith("train_config.json") and lm.preprocess_source.startswith("the run's --codes")
    (old / "train_config.json").write_text(json.dumps({"template": "vicuna_v1"}))  # shards unknown: the tokenizer's
    try:
        assert load_for_eval(old, device="cpu").preprocess_source.startswith("tokenizer")
    finally:
        (old / "train_config.json").write_text(json.dumps({"template": "vicuna_v1", "codes": str(corpus.codes)}))


def test_bench_and_loss_reports_say_what_they_used(runs, corpus, tmp_path, capsys):
    from asvr.eval.cli import main

    recorded, _ = runs
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"image": corpus.keys[0], "question": "Is it red?", "answer": "yes"}) + "\n")
    common = ["--model", str(recorded), "--quiet"]
    for extra, mode, source in ((), "pad", "asvr_config.json"), (("--preprocess", "square"), "square", "--preprocess"):
        out = tmp_path / f"bench_{mode}"
        args = ["bench", *common, "--bench", str(bench), "--images", str(corpus.images), "--max-new-tokens", "2"]
        assert main([*args, "--out", str(out), *extra]) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["config"]["preprocess_mode"] == mode and source in rep["config"]["preprocess_source"]
        assert rep["model"]["template"] == "chatml" and "asvr_config.json" in rep["model"]["template_source"]
        assert rep["model"]["trained_inputs"]["preprocess"] == "pad"
    out = tmp_path / "loss"
    capsys.readouterr()
    assert main(["loss", *common, "--codes", str(corpus.codes), "--data", str(corpus.sft), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["template"] == "chatml" and "asvr_config.json" in rep["model"]["template_source"]
    assert rep["config"]["preprocess_mode"] == "square" and rep["config"]["trained_preprocess"] == "pad"
    assert "template chatml" in capsys.readouterr().out
