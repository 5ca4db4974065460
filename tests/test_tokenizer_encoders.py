"""Strict encoder loading (tiny SigLIP/CLIP saved with save_pretrained) and the
artifact's refusal of mismatched or tampered tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from asvr.tokenizer.artifact import TokenizerError, TokenizerSpec, save_artifact
from asvr.tokenizer.encoders.base import build_encoder, default_encoder_spec
from asvr.tokenizer.model import SemanticTokenizer
from asvr.tokenizer.artifact import CODEBOOKS_FILE, load_artifact
from asvr.tokenizer.encoders.base import EncoderLoadError

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)


def _save_tiny(kind: str, folder):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg_cls, model_cls = (
        (SiglipVisionConfig, SiglipVisionModel) if kind == "siglip" else (CLIPVisionConfig, CLIPVisionModel)
    )
    model = model_cls(cfg_cls(**TINY)).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hf_encoder_loads_strictly_and_matches_hidden_state(kind, tmp_path):
    model = _save_tiny(kind, tmp_path / kind)
    spec = default_encoder_spec(kind, str(tmp_path / kind))
    enc = build_encoder(spec)
    assert enc.grid == (4, 4) and enc.dim == 32
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        got = enc(px)
    if kind == "clip":
        want = want[:, 1:]
    torch.testing.assert_close(got.reshape(2, 16, 32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_hf_encoder_refuses_extra_or_missing_keys(change, tmp_path):
    folder = tmp_path / "siglip"
    _save_tiny("siglip", folder)
    f = folder / "model.safetensors"
    state = load_file(str(f))
    if change == "extra":
        state["embeddings.surprise.weight"] = torch.zeros(3)
    else:
        state.pop("encoder.layers.0.mlp.fc1.weight")
    save_file(state, str(f))
    with pytest.raises(EncoderLoadError, match="unexpected" if change == "extra" else "missing"):
        build_encoder(default_encoder_spec("siglip", str(folder)))


def test_hf_encoder_reads_full_checkpoint_layout(tmp_path):
    """A full SigLIP checkpoint names its tower ``vision_model.*`` beside ``text_model.*``."""
    folder = tmp_path / "siglip"
    model = _save_tiny("siglip", folder)
    f = folder / "model.safetensors"
    state = {"vision_model." + k: v for k, v in load_file(str(f)).items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(5, 32)
    save_file(state, str(f))
    enc = build_encoder(default_encoder_spec("siglip", str(folder)))
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(enc(px).reshape(1, 16, 32), want, rtol=1e-5, atol=1e-5)


def test_tokenizer_refuses_grid_or_dim_mismatch(tmp_path):
    enc = default_encoder_spec()
    for grid, dim in [((8, 8), 320), ((7, 7), 256)]:
        spec = TokenizerSpec(
            encoder=enc, preprocess="square", grid=grid, dim=dim, depth=2, codebook_size=4, shared_codebook=False
        )
        out = (
            save_artifact(tmp_path / f"tok{dim}{grid[0]}", spec, torch.randn(2, 4, dim))
            and tmp_path / f"tok{dim}{grid[0]}"
        )
        with pytest.raises(TokenizerError, match="grid"):
            SemanticTokenizer.load(out)


def test_tampered_codebook_or_json_is_refused(tiny_tokenizer_dir, tmp_path):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    cb = load_file(str(tok / CODEBOOKS_FILE))["codebooks"]
    cb[0, 0, 0] += 1e-3
    save_file({"codebooks": cb}, str(tok / CODEBOOKS_FILE))
    with pytest.raises(TokenizerError, match="fingerprint"):
        load_artifact(tok)
    shutil.rmtree(tok)
    shutil.copytree(tiny_tokenizer_dir, tok)
    js = json.loads((tok / "tokenizer.json").read_text())
    js["encoder"]["feature_layer"] = -2
    (tok / "tokenizer.json").write_text(json.dumps(js))
    with pytest.raises(TokenizerError, match="fingerprint"):
        SemanticTokenizer.load(tok)


def test_unknown_encoder_kind_is_an_error_not_a_clip_fallback(tmp_path):
    from asvr.core.spec import EncoderSpec
    from asvr.tokenizer.encoders.base import EncoderLoadError, build_encoder, encoder_kind
    from asvr.tokenizer.encoders.hf_vision import _hf_classes

    with pytest.raises(EncoderLoadError, match="unknown encoder kind 'dinov2'"):
        encoder_kind("dinov2")
    with pytest.raises(EncoderLoadError, match="unknown encoder kind"):
        _hf_classes("dinov2")  # used to return the CLIP classes for any kind but siglip
    spec = EncoderSpec(kind="dinov2", weights=str(tmp_path), feature_layer=-1, image_size=32)  # data only
    with pytest.raises(EncoderLoadError, match="unknown encoder kind 'dinov2'"):
        build_encoder(spec)


def test_a_registered_kind_is_built_and_listed():
    """What an ``asvr/tokenizer/encoders/<name>.py`` module does: register a kind; nothing else changes."""
    import torch

    from asvr.tokenizer.encoders.base import (
        KINDS,
        EncoderKind,
        EncoderSpec,
        build_encoder,
        default_encoder_spec,
        encoder_kind,
        encoder_kinds,
        kind_of_model_type,
        register_encoder,
    )

    class Mean(torch.nn.Module):
        def forward(self, pixels):
            return torch.nn.functional.avg_pool2d(pixels, 4).permute(0, 2, 3, 1)

    register_encoder(
        EncoderKind(
            "test_pool",
            build=lambda spec, base: Mean(),
            default_spec=lambda w, layer: EncoderSpec("test_pool", "none", -1, 16),
            hf_model_types=("test_pool_model",),
        )
    )
    try:
        assert "test_pool" in encoder_kinds()
        assert list(encoder_kinds())[:3] == ["efficientnet_lite0", "siglip", "clip"]  # built-ins first
        assert kind_of_model_type("test_pool_model").name == "test_pool"  # what --vision-tower DIR asks
        assert kind_of_model_type("clip_vision_model").drop_cls and not encoder_kind("siglip").drop_cls
        assert encoder_kind("siglip").llava_export and not encoder_kind("test_pool").llava_export
        spec = default_encoder_spec("test_pool")
        assert build_encoder(spec)(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 3)
        with pytest.raises(ValueError, match="registered twice"):
            register_encoder(EncoderKind("test_pool", hf_classes=("A", "B")))
    finally:
        KINDS.unregister("test_pool")
