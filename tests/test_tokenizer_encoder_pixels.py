"""The ``pixels`` encoder kind (tokenizer/encoders/pixels.py): the appearance tokenizer of the ASVR ablation."""

from __future__ import annotations

import torch

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

from asvr.tokenizer.encoders.base import build_encoder, default_encoder_spec
from asvr.tokenizer.encoders.base import encoder_kinds


def test_pixels_is_a_registered_kind():
    assert "pixels" in encoder_kinds()


def test_pixels_encoder_is_patch_means_on_the_efficientnet_grid(tmp_path):
    """``--encoder pixels``: the appearance tokenizer's features are pooled pixel patches, position by position
    on the 7 x 7 grid (checked against a numpy loop); the artifact round-trips without weights."""
    import numpy as np

    spec = default_encoder_spec("pixels")
    enc = build_encoder(spec)
    assert enc.grid == (7, 7) and enc.dim == 48
    x = torch.rand(2, 3, 224, 224)
    got = enc(x).numpy()
    ref = np.zeros((2, 7, 7, 48), np.float32)
    xn = x.numpy()
    for i in range(7):
        for j in range(7):
            patch = xn[:, :, 32 * i : 32 * (i + 1), 32 * j : 32 * (j + 1)].reshape(2, 3, 4, 8, 4, 8).mean(axis=(3, 5))
            ref[:, i, j] = patch.transpose(0, 2, 3, 1).reshape(2, 48)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    tok_spec = TokenizerSpec(
        encoder=spec, preprocess="square", grid=(7, 7), dim=48, depth=2, codebook_size=4, shared_codebook=False
    )
    save_artifact(tmp_path / "tok", tok_spec, torch.randn(2, 4, 48))
    tok = SemanticTokenizer.load(tmp_path / "tok")
    assert tuple(tok.encode_pixels(torch.rand(1, 3, 224, 224)).shape) == (1, 7, 7, 2)
