"""The LLM's vision tower on the cases a one-line bug lets through (issue 24): a recorded
tower whose weight files changed is refused; a tower whose feature selection (layer,
``select``, preprocessing) differs has another fingerprint, and a recorded tower rebuilt
with one is refused; the path of the weights is not part of the identity.

References: the fingerprint re-derived here from its definition (sha256 of the sorted JSON
of the encoder fields but ``weights``, plus ``select``), the weight files hashed here with
hashlib, and each refusal's whole message.  Tiny SigLIP/CLIP towers from configs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from test_train_vision_tower import save_tiny_tower

from asvr.core.spec import EncoderSpec
from asvr.core.errors import FingerprintError
from asvr.train.config import VisionTowerSpec
from asvr.train.model.vision_tower import (
    VisionTowerError,
    check_tower_grid,
    load_vision_tower,
    open_vision_tower,
    tower_fingerprint,
)


def _reference_fingerprint(encoder: dict, select: str) -> str:
    d = {k: v for k, v in encoder.items() if k != "weights"}
    d["select"] = select
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _files_sha256(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


BASE = EncoderSpec(kind="siglip", weights="/models/a", feature_layer=-2, image_size=28, weights_sha256="ab" * 32)


def test_fingerprint_is_its_definition_and_covers_every_feature_field():
    fp = tower_fingerprint(BASE, "patch")
    assert fp == _reference_fingerprint(BASE.to_dict(), "patch")
    changed = {
        "kind": "clip",
        "feature_layer": -1,
        "image_size": 32,
        "mean": [0.4, 0.5, 0.5],
        "std": [0.5, 0.5, 0.6],
        "resample": "bilinear",
        "weights_sha256": "cd" * 32,
    }
    seen = {fp}
    for field, value in changed.items():
        other = tower_fingerprint(dataclasses.replace(BASE, **{field: value}), "patch")
        assert other == _reference_fingerprint({**BASE.to_dict(), field: value}, "patch"), field
        seen.add(other)
    seen.add(tower_fingerprint(BASE, "cls_patch"))
    assert len(seen) == len(changed) + 2  # each change of the features: another fingerprint
    # where the files lie is not what they are
    assert tower_fingerprint(dataclasses.replace(BASE, weights="/elsewhere/a"), "patch") == fp


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers24")
    return (
        root,
        save_tiny_tower(root / "siglip", seed=0, hidden=32),
        save_tiny_tower(root / "clip", "clip", seed=1, hidden=32),
    )


def test_a_recorded_tower_whose_weight_files_changed_is_refused(towers, tmp_path):
    root, siglip, _ = towers
    folder = shutil.copytree(siglip, tmp_path / "tower")
    t = open_vision_tower(folder)
    assert t.spec.encoder["weights_sha256"] == _files_sha256(folder)
    assert t.spec.fingerprint == _reference_fingerprint(t.spec.encoder, "patch")
    again = load_vision_tower(t.spec)  # unchanged: rebuilt, same features
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.features(x), t.features(x), rtol=0, atol=0)
    recorded = t.spec.encoder["weights_sha256"]
    save_tiny_tower(folder, seed=5, hidden=32)  # other weights, same config and file names
    with pytest.raises(VisionTowerError) as e:
        load_vision_tower(t.spec)
    assert str(e.value) == (
        f"vision tower weights at {folder.resolve()} are not the recorded ones "
        f"(sha256 {_files_sha256(folder)[:12]} != {recorded[:12]})"
    )
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(VisionTowerError) as e:
        load_vision_tower(t.spec)
    assert str(e.value) == f"vision tower {folder.resolve()}: {folder.resolve()}: no weight files"
    shutil.rmtree(folder)
    with pytest.raises(VisionTowerError) as e:
        load_vision_tower(t.spec)
    assert str(e.value) == f"vision tower {folder.resolve()}: encoder weights not found: {folder.resolve()}"


def test_a_recorded_tower_rebuilt_with_another_feature_selection_is_refused(towers):
    root, siglip, clip = towers
    t = open_vision_tower(clip)
    cls = open_vision_tower(clip, select="cls_patch")
    layer = open_vision_tower(clip, layer=-1)
    prints = {t.spec.fingerprint, cls.spec.fingerprint, layer.spec.fingerprint}
    assert len(prints) == 3 and t.spec.encoder["weights_sha256"] == layer.spec.encoder["weights_sha256"]
    assert t.tokens_per_image == 49 and cls.tokens_per_image == 50 and t.spec.dim == 32
    for select, encoder in (("cls_patch", t.spec.encoder), ("patch", {**t.spec.encoder, "feature_layer": -1})):
        edited = VisionTowerSpec(**{**dataclasses.asdict(t.spec), "select": select, "encoder": encoder})
        with pytest.raises(FingerprintError) as e:
            load_vision_tower(edited)
        got = _reference_fingerprint(encoder, select)
        assert str(e.value) == (
            f"fingerprint mismatch: vision tower {clip.resolve()} has {got[:12]}, "
            f"the recorded one has {t.spec.fingerprint[:12]}"
        )
    # the selection changes the features: CLS first, then the patches of the default
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    a, b = t.features(x), cls.features(x)
    assert b.shape == (1, 50, 32) and a.shape == (1, 49, 32)
    torch.testing.assert_close(b[:, 1:], a, rtol=0, atol=0)
    assert not torch.equal(layer.features(x), a)


def test_tower_refusals_are_one_line(towers, tmp_path):
    root, siglip, _ = towers
    with pytest.raises(VisionTowerError) as e:
        open_vision_tower(siglip, select="cls_patch")
    assert str(e.value) == "--vision-tower-select cls_patch needs a CLIP tower (a CLS token); siglip has none"
    with pytest.raises(VisionTowerError) as e:
        open_vision_tower(siglip, select="cls")
    assert str(e.value).startswith("--vision-tower-select must be one of") and "'cls'" in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(VisionTowerError) as e:
        open_vision_tower(tmp_path / "bad")
    assert str(e.value) == (
        f"--vision-tower {tmp_path / 'bad'}: model_type 'vit' is not a SigLIP or CLIP vision model "
        "(['clip', 'clip_vision_model', 'siglip', 'siglip_vision_model'])"
    )
    (tmp_path / "bad" / "config.json").write_text("{")
    with pytest.raises(VisionTowerError, match="cannot read config.json"):
        open_vision_tower(tmp_path / "bad")
    t = open_vision_tower(siglip)
    check_tower_grid(t.spec, (7, 7))
    with pytest.raises(VisionTowerError) as e:
        check_tower_grid(t.spec, (7, 6))
    assert str(e.value).startswith(
        f"the vision tower {siglip.resolve()} gives a 7x7 patch grid, the tokenizer's targets lie on 7x6:"
    )
