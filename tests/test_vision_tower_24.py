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

import numpy as np
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


def _hf_hidden_state(folder, pixels, layer):
    """The tower run directly through transformers (the reference): hidden state ``layer``."""
    from transformers import SiglipVisionModel

    model = SiglipVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]


def _artifact_with_relative_tower(root, siglip):
    """A tokenizer artifact whose encoder folder lies inside it, recorded by a relative path."""
    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact
    from asvr.tokenizer.encoders.base import default_encoder_spec

    art = root / "tok"
    shutil.copytree(siglip, art / "enc")
    enc = default_encoder_spec("siglip", str(art / "enc"))
    enc.weights = "enc"
    spec = TokenizerSpec(
        encoder=enc, preprocess="square", grid=(7, 7), dim=32, depth=1, codebook_size=4, shared_codebook=False
    )
    save_artifact(art, spec, torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0)))
    return art


def test_a_tokenizer_artifact_as_tower_is_its_encoder_at_the_recorded_or_given_layer(towers, tmp_path):
    """``--vision-tower ARTIFACT``: the encoder folder resolved against the artifact (not the
    working directory), its recorded layer (-2) unless one is given, the source the
    artifact; features = transformers' hidden state of that layer; the tokenizer's own tower
    (``from_tokenizer``) is the same features, select ``patch``, source the artifact."""
    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.model.vision_tower import VisionTower

    root, siglip, _ = towers
    art = _artifact_with_relative_tower(tmp_path, siglip)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    t = open_vision_tower(art)
    assert t.spec.encoder["weights"] == str((art / "enc").resolve()) and t.spec.source == str(art.resolve())
    assert t.spec.encoder["feature_layer"] == -2 and t.spec.select == "patch" and t.spec.grid == (7, 7)
    assert t.spec.encoder["weights_sha256"] == _files_sha256(art / "enc")
    assert t.spec.fingerprint == _reference_fingerprint(t.spec.encoder, "patch")
    torch.testing.assert_close(t.features(x), _hf_hidden_state(siglip, x, -2), rtol=1e-5, atol=1e-5)
    assert load_vision_tower(t.spec).spec == t.spec  # rebuilt as recorded, its source included
    last = open_vision_tower(art, layer=-3)
    assert last.spec.encoder["feature_layer"] == -3
    assert last.spec.encoder["weights_sha256"] == t.spec.encoder["weights_sha256"]
    assert last.spec.fingerprint == _reference_fingerprint(last.spec.encoder, "patch") != t.spec.fingerprint
    torch.testing.assert_close(last.features(x), _hf_hidden_state(siglip, x, -3), rtol=1e-5, atol=1e-5)
    tok = SemanticTokenizer.load(art)
    own = VisionTower.from_tokenizer(tok)
    assert own.encoder is tok.encoder  # shared, not copied
    assert own.spec.select == "patch" and own.spec.source == str(tok.path) and own.spec.source
    assert own.spec.encoder == {**tok.spec.encoder.to_dict()}
    assert own.spec.fingerprint == _reference_fingerprint(tok.spec.encoder.to_dict(), "patch")
    assert own.spec.fingerprint == t.spec.fingerprint  # where the weights lie is not the identity
    torch.testing.assert_close(own.features(x), t.features(x), rtol=0, atol=0)


def test_the_tower_stays_frozen_in_train_mode_and_reads_images_by_path_or_bytes(towers, tmp_path):
    from PIL import Image

    root, siglip, _ = towers
    t = open_vision_tower(siglip)
    assert not any(p.requires_grad for p in t.encoder.parameters())
    assert t.train() is t and t.training and not t.encoder.training
    assert t.train(False) is t and not t.training and not t.encoder.training
    t.train(True)
    assert all(not m.training for m in t.encoder.modules())
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((10, 10, 240), (0, 0, 20, 20))
    img.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    sq = t.preprocess_images([tmp_path / "a.png", data, str(tmp_path / "a.png")], "square")
    assert sq.shape == (3, 3, 28, 28) and sq.dtype == np.float32
    np.testing.assert_array_equal(sq[0], sq[1])
    np.testing.assert_array_equal(sq[0], sq[2])
    pad = t.preprocess_images([bytearray(data)], "pad")
    assert t.preprocess_config("pad").mode == "pad" and t.preprocess_config("square").mode == "square"
    assert t.preprocess_config("square").image_size == 28
    # square: the left half blue, the right half red, edge to edge; pad: bands above and below
    mean, std = 0.5, 0.5
    assert sq[0, 2, 14, 3] == pytest.approx((240 / 255 - mean) / std, abs=0.02)
    assert sq[0, 0, 14, 24] == pytest.approx((200 / 255 - mean) / std, abs=0.02)
    assert not np.allclose(pad[0], sq[0])
    f = t.features(sq)
    assert f.shape == (3, 49, 32) and f.dtype == torch.float32
    from asvr.train.model.vision_tower import VisionTower

    plain = VisionTower(t.encoder, EncoderSpec(**t.spec.encoder))  # the defaults: patch tokens, no source
    assert plain.spec.select == "patch" and plain.spec.source == "" and plain.spec.fingerprint == t.spec.fingerprint
    t.encoder.to(torch.bfloat16)
    fb = t.features(sq)
    assert fb.dtype == torch.float32
    torch.testing.assert_close(fb, f, rtol=0.1, atol=0.1)


def test_the_grid_refusal_names_both_grids_rows_by_columns(towers):
    root, siglip, _ = towers
    t = open_vision_tower(siglip)
    wide = VisionTowerSpec(**{**dataclasses.asdict(t.spec), "grid": (6, 8)})
    with pytest.raises(VisionTowerError) as e:
        check_tower_grid(wide, (5, 7))
    assert str(e.value).startswith(
        f"the vision tower {siglip.resolve()} gives a 6x8 patch grid, the tokenizer's targets lie on 5x7:"
    )
    check_tower_grid(wide, [6, 8])  # a list from JSON is the same grid


def test_a_failed_load_names_the_towers_source_not_its_weights(towers, tmp_path):
    """An artifact tower's source (the artifact) is not its weight folder (``enc`` inside it):
    a load that fails names the source the user gave, then the loader's own message."""
    root, siglip, _ = towers
    art = _artifact_with_relative_tower(tmp_path, siglip)
    t = open_vision_tower(art)
    enc = (art / "enc").resolve()
    assert t.spec.source == str(art.resolve()) != t.spec.encoder["weights"] == str(enc)
    for f in enc.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(VisionTowerError) as e:
        load_vision_tower(t.spec)
    assert str(e.value) == f"vision tower {art.resolve()}: {enc}: no weight files"


def test_the_tower_of_a_tokenizer_built_in_memory_has_no_source(towers, tmp_path):
    """A tokenizer without a folder (``path`` None): its tower records source ``""``."""
    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.model.vision_tower import VisionTower

    root, siglip, _ = towers
    tok = SemanticTokenizer.load(_artifact_with_relative_tower(tmp_path, siglip))
    mem = SemanticTokenizer(tok.spec, tok.encoder, tok.quantizer.codebooks)
    assert mem.path is None
    own = VisionTower.from_tokenizer(mem)
    assert own.spec.source == "" and own.spec.select == "patch" and own.encoder is tok.encoder


def test_a_folder_that_is_neither_an_artifact_nor_a_hf_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(VisionTowerError) as e:
        open_vision_tower(tmp_path)
    assert str(e.value) == (
        f"--vision-tower {tmp_path}: neither a tokenizer artifact (tokenizer.json) nor a Hugging "
        "Face vision folder (config.json)"
    )
