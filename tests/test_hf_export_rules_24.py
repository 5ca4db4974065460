"""HF LLaVA export pieces the logit tests reached only through a cached export (issue 24,
mutation survivors of ``hf_llava``): the visual head written beside the model (weights,
safetensors metadata, its config against the model's own), the run's template, and the two
readers ``asvr-eval`` uses to recognise an export.  Each test exports afresh, so the code
it checks runs inside it.  References: the model's own head and config, hand-written files.
"""

from __future__ import annotations

import json

import numpy as np
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


def _json_error(text: str) -> str:
    """The message json gives for ``text`` (what a refusal quotes)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return str(e)
    raise AssertionError(f"{text!r} is valid JSON")


def test_the_runs_template_and_an_unreadable_run_config(tmp_path):
    assert run_template_name(None) == "vicuna_v1"
    (tmp_path / "train_config.json").write_text(json.dumps({"template": "chatml"}))
    assert run_template_name(tmp_path) == "chatml"
    for cfg in ({"stage": "sft"}, {"template": ""}):
        (tmp_path / "train_config.json").write_text(json.dumps(cfg))
        assert run_template_name(tmp_path) == "vicuna_v1"
    (tmp_path / "train_config.json").write_text("{not json")
    with pytest.raises(HFExportError) as err:
        run_template_name(tmp_path)
    assert str(err.value) == f"{tmp_path / 'train_config.json'}: cannot read ({_json_error('{not json')})"
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


NOTE = "how the model was trained to read its inputs; the processor and chat template apply it"


def test_the_inputs_record_and_head_config_as_written(world, tmp_path):
    """``asvr_inputs.json`` says how the model reads its inputs (the run's template, the
    tokenizer's preprocessing); both JSON files are written indented by 2, newline-ended."""
    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.export.cli import main

    root, runs, _ = world
    out = tmp_path / "hf"
    assert main([str(runs["pad"]), "--hf-llava", str(out)]) == 0
    pre = SemanticTokenizer.load(root / "tok_pad").preprocess_config(None, False)
    text = (out / INPUTS_FILE).read_text()
    rec = json.loads(text)
    assert rec == {
        "template": "vicuna_v1",  # RUN/train_config.json's
        "template_source": "run",
        "preprocess": "pad",
        "image_size": pre.image_size,
        "resample": pre.resample,
        "after_image": rec["after_image"],
        "note": NOTE,
    }
    assert isinstance(rec["after_image"], str)
    assert text == json.dumps(rec, indent=2) + "\n"
    head = (out / "asvr_visual_head" / "config.json").read_text()
    assert head == json.dumps(json.loads(head), indent=2) + "\n"


def test_an_overwrite_that_would_drop_user_files_names_the_first_three(world, tmp_path):
    from asvr.train.export.hf_llava import export_hf_llava

    _, runs, _ = world
    out = tmp_path / "hf"
    export_hf_llava(runs["pad"], out)
    for name in ("notes-a.txt", "notes-b.txt", "notes-c.txt", "notes-d.txt"):
        (out / name).write_text("mine")
    with pytest.raises(HFExportError) as e:
        export_hf_llava(runs["pad"], out, overwrite=True)
    assert str(e.value) == (
        f"--hf-llava {out}: the earlier export there also holds notes-a.txt, notes-b.txt, notes-c.txt, which this "
        "export does not write; move them away first (nothing was replaced)"
    )
    assert (out / "notes-d.txt").read_text() == "mine"


def test_an_llm_with_tied_embeddings_exports_tied_with_the_same_logits(world, tmp_path):
    """Small LLMs (Qwen2-0.5B, ...) tie the output layer to the input embedding: the export keeps
    the tie (no separate lm_head in the files) and gives the logits of asvr's own inference."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.config import ModelConfig
    from asvr.train.export.cli import main
    from asvr.train.export.native import save_exported
    from asvr.train.model.lvlm import build_model

    root, _, images = world
    llm = AutoModelForCausalLM.from_pretrained(root / "llm")
    llm.config.tie_word_embeddings = True
    llm.tie_weights()
    llm.save_pretrained(tmp_path / "tied_llm")
    AutoTokenizer.from_pretrained(root / "llm").save_pretrained(tmp_path / "tied_llm")
    tok = SemanticTokenizer.load(root / "tok_square")
    torch.manual_seed(2)
    model = build_model(ModelConfig(llm=str(tmp_path / "tied_llm"), vision_input="online", head=base.HEAD), tok)
    assert model.llm.config.tie_word_embeddings
    with torch.no_grad():
        for p in model.projector.parameters():
            p.mul_(4.0)
    run = tmp_path / "run"
    save_exported(model, run / "final", AutoTokenizer.from_pretrained(tmp_path / "tied_llm"))
    (run / "train_config.json").write_text(json.dumps({"template": "vicuna_v1", "stage": "sft"}))
    out = tmp_path / "hf"
    assert main([str(run), "--hf-llava", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["tie_word_embeddings"] is True or cfg.get("tie_word_embeddings") is True
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    assert not any(k.endswith("lm_head.weight") for k in keys), sorted(keys)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    lm, ids, mask, pixels, logits = base._ours(run, images[0], base.QUESTIONS[0])
    processor, model_hf, inputs = base._theirs(out, images[0], base.QUESTIONS[0])
    want = np.where(mask, model_hf.config.image_token_id, ids)
    with torch.no_grad():
        theirs = model_hf(input_ids=torch.from_numpy(want)[None], pixel_values=inputs["pixel_values"]).logits[0]
    torch.testing.assert_close(theirs[:, : logits.shape[-1]], logits, rtol=1e-4, atol=1e-4)


def test_a_broken_run_config_an_export_folder_and_overwrite(world, tmp_path):
    """A run whose train_config.json is unreadable is one line naming it; RUN/final itself
    exports (no run around it); an earlier export is refused without --overwrite and replaced with it."""
    import shutil

    from asvr.train.export.hf_llava import export_hf_llava

    _, runs, _ = world
    run = tmp_path / "run"
    shutil.copytree(runs["pad"], run)
    (run / "train_config.json").write_text("{not json")
    with pytest.raises(HFExportError) as err:
        export_hf_llava(run, tmp_path / "x")
    assert str(err.value) == f"{run / 'train_config.json'}: cannot read ({_json_error('{not json')})"
    assert not (tmp_path / "x").exists()

    out = tmp_path / "hf"
    bare = tmp_path / "bare_export"
    shutil.copytree(runs["pad"] / "final", bare)  # an export folder with no run around it
    export_hf_llava(bare, out)
    assert json.loads((out / INPUTS_FILE).read_text())["template"] == "vicuna_v1"  # the default, no run config
    with pytest.raises(HFExportError) as err:
        export_hf_llava(bare, out)
    assert str(err.value) == f"--hf-llava {out} holds an earlier LLaVA export; --overwrite replaces it"
    before = (out / "config.json").stat().st_ino
    export_hf_llava(bare, out, overwrite=True)
    assert (out / "config.json").stat().st_ino != before and is_hf_llava(out)


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "lanczos", "nearest"])
def test_the_processor_resizes_with_the_towers_filter_and_converts_to_rgb(world, resample):
    """The exported image processor against PIL: the tower's filter, RGB conversion of a grey image."""
    from PIL import Image
    from transformers import AutoTokenizer

    from asvr.train.data.templates import vicuna_v1
    from asvr.train.export.hf_processor import processor
    from asvr.train.export.hf_tower import HFTower

    root, _, _ = world
    tower = HFTower("siglip", None, None, 16, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resample, "square")
    p = processor(tower, AutoTokenizer.from_pretrained(root / "llm"), vicuna_v1())
    filt = getattr(Image.Resampling, resample.upper())
    assert p.image_processor.resample == int(filt)
    rng = np.random.default_rng(3)
    grey = Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8), "L")
    got = p.image_processor(images=grey, return_tensors="np")["pixel_values"][0]
    ref = np.asarray(grey.convert("RGB").resize((16, 16), resample=filt), np.float32) / 255
    ref = ((ref - 0.5) / 0.5).transpose(2, 0, 1)
    np.testing.assert_allclose(got, ref, atol=1e-5)
