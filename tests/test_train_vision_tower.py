"""--vision-tower: the LLM's vision input comes from its own tower, independent of
the target tokenizer (the paper: SigLIP-so400m input, DualToken's SigLIP + codebooks
as targets).  Tiny SigLIP/CLIP folders are built here from configs (random init,
save_pretrained): the tokenizer's SigLIP (32-d) and the LLM's tower (48-d) differ,
and the projector's input is compared with the tower run directly through
transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

from asvr.tokenizer.encoders.base import default_encoder_spec
from asvr.train.cli import main
from asvr.train.loop.metrics import read_metrics
from train_corpus import TINY_HEAD, make_corpus


def save_tiny_tower(
    folder: Path, kind: str = "siglip", *, seed: int, hidden: int, image_size: int = 28, patch: int = 4, layers: int = 3
) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    cfg_cls, model_cls = (
        (SiglipVisionConfig, SiglipVisionModel) if kind == "siglip" else (CLIPVisionConfig, CLIPVisionModel)
    )
    torch.manual_seed(seed)
    model_cls(
        cfg_cls(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
        )
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A SigLIP tokenizer (7x7x32, depth 2), a different SigLIP tower (7x7x48), a corpus."""
    root = tmp_path_factory.mktemp("tower")
    tok_siglip = save_tiny_tower(root / "tok_siglip", seed=0, hidden=32)
    tower = save_tiny_tower(root / "tower_siglip", seed=1, hidden=48)
    spec = TokenizerSpec(
        encoder=default_encoder_spec("siglip", str(tok_siglip)),
        preprocess="square",
        grid=(7, 7),
        dim=32,
        depth=2,
        codebook_size=16,
        shared_codebook=False,
    )
    save_artifact(root / "tok", spec, torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)))
    tokenizer = SemanticTokenizer.load(root / "tok")
    corpus = make_corpus(root / "corpus", tokenizer, n_images=6, n_captioned=4)
    return root, tokenizer, tower, corpus


def _args(setup, out, *extra, data=None):
    root, _, tower, corpus = setup
    return [
        "--model",
        str(corpus.llm),
        "--tokenizer",
        str(root / "tok"),
        "--codes",
        str(corpus.codes),
        "--data",
        str(data or corpus.sft),
        "--images",
        str(corpus.images),
        "--output-dir",
        str(out),
        "--stage",
        "sft",
        "--max-len",
        "256",
        "--quiet",
        *TINY_HEAD,
        *extra,
    ]


def _reference_tower(folder: Path, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """The tower run directly through transformers: hidden state ``layer``, ``[N, 49, C]``."""
    from transformers import SiglipVisionModel

    model = SiglipVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]


@pytest.fixture(scope="module")
def online_run(setup, tmp_path_factory):
    root, _, tower, corpus = setup
    out = tmp_path_factory.mktemp("runs") / "online"
    assert (
        main(
            _args(
                setup, out, "--vision-input", "online", "--vision-tower", str(tower), "--max-steps", "3", "--lr", "1e-3"
            )
        )
        == 0
    )
    return out


def test_online_tower_feeds_the_projector_trains_and_evaluates(setup, online_run, tmp_path):
    from asvr.eval.cli import main as eval_main
    from asvr.eval.loading import load_for_eval

    root, tokenizer, tower, corpus = setup
    meta = json.loads((online_run / "final" / "asvr_config.json").read_text())["model"]
    rec = meta["vision_tower"]
    assert rec["source"] == str(tower.resolve()) and rec["dim"] == 48 and rec["grid"] == [7, 7]
    assert rec["encoder"]["kind"] == "siglip" and rec["encoder"]["weights_sha256"]
    assert meta["vision"]["fingerprint"] == tokenizer.spec.fingerprint  # targets: still the tokenizer's
    metrics = read_metrics(online_run)
    assert len(metrics) == 3 and all(np.isfinite(r["loss"]) and r["loss_visual"] > 0 for r in metrics)

    lm = load_for_eval(online_run, device="cpu")
    model = lm.model
    assert model.projector[0].in_features == 48  # the tower's width, not the codebooks' 32
    keys = corpus.keys[:2]
    pixels = lm.tower.preprocess_images([corpus.images / k for k in keys], "square")
    seen = []
    model.projector.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    from asvr.train.data.batch import Batch

    ids = torch.zeros(1, 2 * 49 + 3, dtype=torch.long)
    img = torch.zeros_like(ids, dtype=torch.bool)
    img[0, 1:50] = img[0, 51:100] = True
    batch = Batch(
        input_ids=ids,
        labels=torch.full_like(ids, -100),
        position_ids=torch.arange(ids.shape[1])[None],
        sample_ids=torch.ones_like(ids),
        image_mask=img,
        vision=torch.from_numpy(pixels),
    )
    model.hidden_states(batch)
    want = _reference_tower(tower, torch.from_numpy(pixels)).reshape(-1, 48)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)
    tok_feats = tokenizer.features(tokenizer.preprocess_images([corpus.images / k for k in keys]))
    assert tok_feats.shape[-1] == 32  # the tokenizer's SigLIP is another model

    assert (
        eval_main(
            [
                "loss",
                "--model",
                str(online_run),
                "--codes",
                str(corpus.codes),
                "--data",
                str(corpus.sft),
                "--images",
                str(corpus.images),
                "--out",
                str(tmp_path / "loss"),
                "--quiet",
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "loss" / "report.json").read_text())
    assert rep["results"]["visual"]["positions"] == 4 * 49 and rep["results"]["text"]["tokens"] > 0
    assert rep["model"]["vision_tower"] == str(tower.resolve())
    bench = tmp_path / "b.jsonl"
    bench.write_text(
        "".join(json.dumps({"image": k, "question": "Is it red?", "answer": "yes"}) + "\n" for k in corpus.keys[:2])
    )
    assert (
        eval_main(
            [
                "bench",
                "--model",
                str(online_run),
                "--bench",
                str(bench),
                "--images",
                str(corpus.images),
                "--max-new-tokens",
                "2",
                "--out",
                str(tmp_path / "bench"),
                "--quiet",
            ]
        )
        == 0
    )
    assert len((tmp_path / "bench" / "predictions.jsonl").read_text().splitlines()) == 2


def test_features_cache_holds_the_towers_output_and_is_named_by_it(setup, online_run, tmp_path):
    from asvr.train.data.sources import FeatureCache
    from asvr.train.model.vision_tower import open_vision_tower

    root, tokenizer, tower, corpus = setup
    out = tmp_path / "feat"
    assert (
        main(
            _args(
                setup,
                out,
                "--vision-input",
                "features",
                "--vision-tower",
                str(tower),
                "--max-steps",
                "3",
                "--lr",
                "1e-3",
            )
        )
        == 0
    )
    t = open_vision_tower(tower)
    caches = sorted((out / "cache").glob("features-*.npy"))
    assert [c.name.split("-")[1] for c in caches] == [t.spec.fingerprint[:12]]
    keys = json.loads(caches[0].with_suffix(".keys.json").read_text())
    assert sorted(keys) == sorted(corpus.keys[:4])  # the captioned images, the only ones used
    from asvr.train.data.sources import CodeStore

    store = CodeStore.open(corpus.codes, tokenizer.spec.fingerprint)
    arr = np.load(caches[0])
    pixels = t.preprocess_images([corpus.images / k for k in keys], "square")
    want = _reference_tower(tower, torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(arr[[store.index[k] for k in keys]], want, rtol=1e-5, atol=1e-5)
    # the same steps as the online run: features equal the tower's output
    a, b = read_metrics(online_run), read_metrics(out)
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    # another tower (or layer) never reads this cache
    other = open_vision_tower(tower, layer=-1)
    assert FeatureCache.open(out / "cache", store, other.spec.fingerprint).path != caches[0]
    assert other.spec.fingerprint != t.spec.fingerprint
    assert json.loads((out / "final" / "asvr_config.json").read_text())["model"]["vision_tower"]["dim"] == 48
    from asvr.eval.cli import main as eval_main  # a features model evaluates with the tower's features

    assert (
        eval_main(
            [
                "loss",
                "--model",
                str(out),
                "--codes",
                str(corpus.codes),
                "--data",
                str(corpus.sft),
                "--images",
                str(corpus.images),
                "--out",
                str(tmp_path / "loss"),
                "--quiet",
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "loss" / "report.json").read_text())
    assert rep["model"]["vision_input"] == "features" and rep["results"]["visual"]["positions"] == 4 * 49


def test_tokenizer_artifact_as_tower_equals_default(setup):
    """--vision-tower TOKENIZER_DIR uses that artifact's encoder: here the target
    tokenizer's own, so it gives the default tower's features."""
    from asvr.train.model.vision_tower import VisionTower, open_vision_tower

    root, tokenizer, _, corpus = setup
    t = open_vision_tower(root / "tok")
    d = VisionTower.from_tokenizer(tokenizer)
    assert t.spec.fingerprint == d.spec.fingerprint and t.spec.dim == 32
    px = t.preprocess_images([corpus.images / corpus.keys[0]], "square")
    torch.testing.assert_close(t.features(px), d.features(px))


def test_cls_patch_clip_tower_adds_one_untargeted_position(setup, tmp_path):
    from asvr.train.config import ModelConfig, VisualHeadConfig
    from asvr.train.model.lvlm import build_model
    from asvr.train.model.vision_tower import open_vision_tower
    from test_train_model import collate, make_sample

    root, tokenizer, _, corpus = setup
    clip = save_tiny_tower(tmp_path / "clip", "clip", seed=2, hidden=40)
    t = open_vision_tower(clip, select="cls_patch")
    assert t.tokens_per_image == 50
    cfg = ModelConfig(
        llm=str(corpus.llm),
        vision_input="online",
        vision_tower=t.spec,
        head=VisualHeadConfig(width=64, proj_hidden=64, layers=1, head_dim=32),
    )
    model = build_model(cfg, tokenizer, tower=t)
    s = make_sample(3, 2, True, 3, grid=(7, 7), depth=2, k=16)
    batch = collate([[s]], 60, "codes", model)
    ids = torch.cat([batch.input_ids[:, :3], torch.zeros(1, 1, dtype=torch.long), batch.input_ids[:, 3:]], 1)
    img = torch.cat([batch.image_mask[:, :3], torch.ones(1, 1, dtype=torch.bool), batch.image_mask[:, 3:]], 1)
    assert int(img.sum()) == 50
    batch.input_ids, batch.image_mask = ids, img
    batch.labels = torch.cat([batch.labels[:, :3], torch.full((1, 1), -100), batch.labels[:, 3:]], 1)
    batch.position_ids = torch.arange(ids.shape[1])[None]
    batch.sample_ids = torch.ones_like(ids)
    batch.vision = torch.from_numpy(t.preprocess_images([corpus.images / corpus.keys[0]], "square"))
    _, m = model.training_forward(batch)
    assert int(m["n_visual_tokens"]) == 49 and np.isfinite(float(m["loss"]))
    with pytest.raises(ValueError, match="CLS"):
        open_vision_tower(root / "tower_siglip", select="cls_patch")


def test_tower_errors_are_one_line(setup, tmp_path, capsys):
    root, _, tower, _ = setup
    assert main(_args(setup, tmp_path / "r1", "--vision-input", "codes", "--vision-tower", str(tower))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asvr-train: error:") and "\n" not in err and "codes" in err
    big = save_tiny_tower(tmp_path / "big", seed=3, hidden=48, image_size=32)  # 8x8 grid
    capsys.readouterr()  # transformers' save progress
    assert main(_args(setup, tmp_path / "r2", "--vision-input", "online", "--vision-tower", str(big))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "8x8" in err and "7x7" in err
    assert main(_args(setup, tmp_path / "r3", "--vision-input", "online", "--vision-tower", str(tmp_path))) == 2
    assert "neither a tokenizer artifact" in capsys.readouterr().err


def test_init_from_a_run_with_another_tower_is_refused(setup, online_run, tmp_path, capsys):
    assert (
        main(
            _args(setup, tmp_path / "r", "--vision-input", "online", "--init-from", str(online_run), "--max-steps", "1")
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("asvr-train: error:") and "vision tower" in err
