"""``pixels``: raw pixel patches as features, the *appearance* target of the ASVR ablation.

The paper's central contrast (Table 1) swaps the semantic targets for the
codes of an appearance tokenizer.  Here an appearance tokenizer is the same
residual quantization over raw pixels instead of encoder features: the
preprocessed image ``[B, 3, S, S]`` is average-pooled to ``grid * patch``
pixels a side and cut into a ``grid x grid`` array of ``patch x patch x 3``
patches, so it lines up with the semantic encoder's grid position by
position (EfficientNet-Lite0: 7 x 7 at 224 px; with ``patch`` 4 a feature is
48 normalised pixel values).  ``asvr-tokenizer train --encoder pixels``
trains its codebooks like any other encoder's.  No weights; ``feature_layer`` records the
patch side (default 4).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from asvr.tokenizer.encoders.base import NO_WEIGHTS_PREFIX, EncoderKind, EncoderSpec, register_encoder

PIXELS_WEIGHTS_REF = NO_WEIGHTS_PREFIX + "pixels"


class PixelPatchEncoder(torch.nn.Module):
    def __init__(self, grid: int = 7, patch: int = 4, image_size: int = 224):
        super().__init__()
        if grid < 1 or patch < 1 or image_size < grid * patch:
            raise ValueError(
                f"pixels encoder: need 1 <= grid * patch <= image size, got {grid} x {patch} > {image_size}"
            )
        self.side, self.patch, self.image_size = grid, patch, image_size
        self.grid = (grid, grid)
        self.dim = 3 * patch * patch

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        g, p = self.side, self.patch
        x = F.adaptive_avg_pool2d(pixels.float(), g * p)  # [B, 3, g*p, g*p]
        x = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # [B, g, g, p, p, 3]
        return x.reshape(b, g, g, self.dim).contiguous()


def _build(spec: EncoderSpec, base: Path | None) -> torch.nn.Module:
    return PixelPatchEncoder(grid=spec.image_size // 32, patch=spec.feature_layer, image_size=spec.image_size)


def _default_spec(weights: str | None, feature_layer: int | None) -> EncoderSpec:
    """EfficientNet-Lite0's grid at 224 px (7 x 7); ``feature_layer`` is the patch side."""
    return EncoderSpec(
        kind="pixels",
        weights=PIXELS_WEIGHTS_REF,
        feature_layer=4 if feature_layer is None else feature_layer,
        image_size=224,
    )


register_encoder(EncoderKind(name="pixels", build=_build, default_spec=_default_spec))
