"""HF LLaVA export pieces the logit tests reached only through a cached export (issue 24,
mutation survivors of ``hf_llava``): the visual head written beside the model (weights,
safetensors metadata, its config against the model's own), the run's template, and the two
readers ``asvr-eval`` uses to recognise an export.  Each test exports afresh, so the code
it checks runs inside it.  References: the model's own head and config, hand-written files.
"""

from __future__ import annotations

import json

import pytest
import torch

import test_hf_llava_export as base

from asvr.train.export.hf_llava import INPUTS_FILE, HFExportError, is_hf_llava, read_hf_inputs, run_template_name

world = base.world  # the module fixture: tiny towers, tokenizers, LLM and run folders


def test_the_visual_head_beside_the_export_is_the_models_own(world, tmp_path):
    from safetensors import safe_open

    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.export.cli import main
    from asvr.train.export.native import load_exported

    root, runs, _ = world
    out = tmp_path / "hf"
    assert main([str(runs["pad"]), "--hf-llava", str(out)]) == 0
    model = load_exported(runs["pad"] / "final", tokenizer=SemanticTokenizer.load(root / "tok_pad"))
    head = out / "asvr_visual_head"
    assert sorted(p.name for p in head.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(head / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        want = model.head.state_dict()
        assert set(f.keys()) == set(want)
        for k in want:
            assert torch.equal(f.get_tensor(k), want[k].detach().cpu()), k
    v = model.cfg.vision
    assert json.loads((head / "config.json").read_text()) == {
        "head": model.cfg.to_dict()["head"],
        "llm_hidden_size": model.llm.config.hidden_size,
        "dim": v.dim,
        "depth": v.depth,
        "codebook_size": v.codebook_size,
        "tokenizer_fingerprint": v.fingerprint,
        "note": "ASVR's training-only visual head (not part of the LLaVA model in the folder above)",
    }
    assert json.loads((head / "config.json").read_text())["head"]["width"] == base.HEAD.width
    assert is_hf_llava(out) and isinstance(read_hf_inputs(out), dict)


def test_the_runs_template_and_an_unreadable_run_config(tmp_path):
    assert run_template_name(None) == "vicuna_v1"
    (tmp_path / "train_config.json").write_text(json.dumps({"template": "chatml"}))
    assert run_template_name(tmp_path) == "chatml"
    for cfg in ({"stage": "sft"}, {"template": ""}):
        (tmp_path / "train_config.json").write_text(json.dumps(cfg))
        assert run_template_name(tmp_path) == "vicuna_v1"
    (tmp_path / "train_config.json").write_text("{not json")
    try:
        json.loads("{not json")
    except json.JSONDecodeError as e:
        why = str(e)
    with pytest.raises(HFExportError) as err:
        run_template_name(tmp_path)
    assert str(err.value) == f"{tmp_path / 'train_config.json'}: cannot read ({why})"
    with pytest.raises(HFExportError) as err:
        run_template_name(tmp_path / "gone")
    assert str(err.value).startswith(f"{tmp_path / 'gone' / 'train_config.json'}: cannot read ([Errno 2]")


@pytest.mark.parametrize(
    "text,want",
    [
        (None, None),
        ('{"tokenizer": "tok"}', {"tokenizer": "tok"}),
        ('["tokenizer"]', None),
        ("{broken", None),
    ],
)
def test_read_hf_inputs(tmp_path, text, want):
    if text is not None:
        (tmp_path / INPUTS_FILE).write_text(text)
    assert read_hf_inputs(tmp_path) == want


@pytest.mark.parametrize(
    "text,want",
    [(None, False), ('{"model_type": "llava"}', True), ('{"model_type": "llama"}', False), ("{broken", False)],
)
def test_is_hf_llava(tmp_path, text, want):
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    assert is_hf_llava(tmp_path) is want
