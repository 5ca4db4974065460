"""The vision *input* of the LVLM: what the projector sees for each image.

* ``online``: the frozen tokenizer encoder on preprocessed pixels
  ``[N, 3, S, S]`` -> features ``[N, H, W, C]`` (the paper's best setting;
  costs an encoder forward per step).
* ``features``: cached continuous features ``[N, H, W, C]`` given as they are.
* ``codes``: features rebuilt from cached codes ``[N, H, W, D]`` as the sum of
  their codebook vectors (``tokenizer.decode``); no encoder, no images.

All three are frozen: no gradient reaches the encoder or the codebooks.  The
codebooks live here (a non-persistent buffer, never exported: they belong to
the tokenizer artifact) and also feed the visual head's teacher forcing.
"""
from __future__ import annotations

import torch
from torch import nn

from asvr.tokenizer.quantizer import ResidualQuantizer

from .config import VisionSpec


class VisionInput(nn.Module):
    def __init__(self, mode: str, spec: VisionSpec, codebooks: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        if mode == "online" and encoder is None:
            raise ValueError("vision_input 'online' needs the tokenizer's encoder (pass a SemanticTokenizer)")
        want = (spec.codebook_size, spec.dim)
        if codebooks.ndim != 3 or tuple(codebooks.shape[1:]) != want or codebooks.shape[0] not in (1, spec.depth):
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)} do not fit depth {spec.depth}, K x C {want}")
        self.mode = mode
        self.spec = spec
        self.quantizer = ResidualQuantizer(codebooks, depth=spec.depth)
        self.encoder = encoder if mode == "online" else None
        if self.encoder is not None:
            self.encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "VisionInput":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: batch-norm statistics and dropout stay in eval mode
        return self

    @torch.no_grad()
    def forward(self, vision: torch.Tensor | None) -> torch.Tensor:
        """``vision`` (see module doc) or None -> features ``[N, H*W, C]`` (N may be 0)."""
        s = self.spec
        if vision is None:
            return self.quantizer.codebooks.new_zeros(0, s.tokens_per_image, s.dim)
        if self.mode == "online":
            if vision.ndim != 4 or vision.shape[1] != 3:
                raise ValueError(f"online vision input must be pixels [N, 3, S, S], got {tuple(vision.shape)}")
            p = next(self.encoder.parameters(), None)
            feats = self.encoder(vision.to(p.dtype if p is not None else torch.float32))
        elif self.mode == "features":
            feats = vision
        else:
            if vision.dtype.is_floating_point or vision.shape[-1] != s.depth:
                raise ValueError(f"codes vision input must be integer [N, H, W, {s.depth}], got {vision.dtype} {tuple(vision.shape)}")
            feats = self.quantizer.decode(vision)
        if tuple(feats.shape[1:]) != (*s.grid, s.dim):
            raise ValueError(f"vision features have shape {tuple(feats.shape)}, the tokenizer gives [N, {s.grid[0]}, {s.grid[1]}, {s.dim}]")
        return feats.reshape(feats.shape[0], s.tokens_per_image, s.dim)

    def code_context(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input of the visual head: codes ``[N, D]`` -> cumulative
        codebook sums of the first D-1 depths ``[N, D-1, C]``."""
        if codes.shape[1] <= 1:
            return self.quantizer.codebooks.new_zeros(codes.shape[0], 0, self.spec.dim)
        return self.quantizer.cumulative(codes[:, :-1])
