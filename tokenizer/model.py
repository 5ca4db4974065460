"""The semantic visual tokenizer: frozen encoder + feature layer + RVQ codebooks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from asvr.tokenizer.artifact import TokenizerError, TokenizerSpec, load_artifact
from asvr.tokenizer.encoders.base import EncoderSpec, build_encoder, encoder_geometry, hash_encoder_weights
from asvr.tokenizer.preprocess import PreprocessConfig, open_image, preprocess
from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, default_search_dtype


class SemanticTokenizer(torch.nn.Module):
    def __init__(
        self, spec: TokenizerSpec, encoder: torch.nn.Module, codebooks: torch.Tensor, path: Path | None = None
    ):
        super().__init__()
        grid, dim = encoder_geometry(encoder)
        if tuple(grid) != tuple(spec.grid) or dim != spec.dim:
            raise TokenizerError(
                f"tokenizer expects a {spec.grid[0]}x{spec.grid[1]} grid of {spec.dim}-d features, the encoder gives "
                f"{grid[0]}x{grid[1]} x {dim}-d"
            )
        self.spec = spec
        self.path = path
        self.encoder = encoder
        self.quantizer = ResidualQuantizer(codebooks, depth=spec.depth)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        *,
        encoder_path: str | None = None,
        verify_weights: bool = True,
        hash_cache: bool = True,
    ) -> "SemanticTokenizer":
        """Load an artifact directory.  ``encoder_path`` points a Hugging Face
        encoder at another folder (the artifact moved machines); its weights must
        hash to what the artifact recorded.  ``hash_cache``: a digest recorded for the
        files' unchanged state is reused (asvr.tokenizer.encoders.weights_hash), so the weights
        are read once per machine, not at every load (every encode actor)."""
        path = Path(path)
        spec, cb = load_artifact(path)
        if encoder_path is not None:
            spec.encoder.weights = str(Path(encoder_path).resolve())
        if verify_weights:
            got = hash_encoder_weights(spec.encoder, path, cache=hash_cache)
            if got != spec.encoder.weights_sha256:
                raise TokenizerError(
                    f"encoder weights at {spec.encoder.weights} are not the ones this tokenizer was built with "
                    f"(sha256 {got[:12]} != {spec.encoder.weights_sha256[:12]})"
                )
        encoder = build_encoder(spec.encoder, path)
        return cls(spec, encoder, cb, path).to(device)

    @classmethod
    def from_parts(
        cls, encoder_spec: EncoderSpec, codebooks: torch.Tensor, preprocess: str = "square", depth: int | None = None
    ) -> "SemanticTokenizer":
        """In-memory tokenizer (tests, training codebooks)."""
        encoder = build_encoder(encoder_spec)
        depth = codebooks.shape[0] if depth is None else depth
        grid, dim = encoder_geometry(encoder)
        spec = TokenizerSpec(
            encoder=encoder_spec,
            preprocess=preprocess,
            grid=grid,
            dim=dim,
            depth=depth,
            codebook_size=codebooks.shape[1],
            shared_codebook=codebooks.shape[0] == 1 and depth > 1,
        )
        return cls(spec, encoder, codebooks)

    # ------------------------------------------------------------------ config
    @property
    def device(self) -> torch.device:
        return self.quantizer.codebooks.device

    def preprocess_config(self, mode: str | None = None, fast_decode: bool = False) -> PreprocessConfig:
        return PreprocessConfig.for_encoder(self.spec.encoder, mode or self.spec.preprocess, fast_decode=fast_decode)

    # ------------------------------------------------------------------ compute
    @torch.no_grad()
    def features(self, pixels: torch.Tensor | np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """pixels ``[B, 3, S, S]`` -> float32 features ``[B, H, W, C]``.  ``dtype``
        runs the encoder under autocast (bf16 on GPU); codes stay exact for the
        features it produced."""
        pixels = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        if dtype is not None and dtype != torch.float32:
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                return self.encoder(pixels).float()
        return self.encoder(pixels.float()).float()

    @torch.no_grad()
    def encode_pixels(
        self, pixels, *, search_dtype: str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """pixels -> codes ``[B, H, W, D]`` (int64)."""
        return self.quantize(self.features(pixels, dtype=dtype), search_dtype=search_dtype)

    @torch.no_grad()
    def quantize(self, feats: torch.Tensor, search_dtype: str | None = None) -> torch.Tensor:
        """features ``[..., C]`` -> codes ``[..., D]`` (int64), exact for these features."""
        if search_dtype is None:
            # the fused bf16x3 kernel on CUDA (with triton), fp32 elsewhere: quantizer.default_search_dtype
            search_dtype = default_search_dtype(feats.device)
        cand = 16
        return self.quantizer.encode(feats, search_dtype=search_dtype, candidates=cand)

    def preprocess_images(
        self,
        images: Sequence[bytes | Image.Image | str | os.PathLike],
        mode: str | None = None,
        fast_decode: bool = False,
    ) -> np.ndarray:
        cfg = self.preprocess_config(mode, fast_decode)
        out = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                im = Path(im).read_bytes()
            if isinstance(im, (bytes, bytearray)):
                im = open_image(bytes(im), cfg)
            out.append(preprocess(im, cfg))
        return np.stack(out)

    def encode_images(self, images: Iterable, mode: str | None = None, **kw) -> torch.Tensor:
        """Images (paths, bytes or PIL) -> codes ``[B, H, W, D]``."""
        return self.encode_pixels(self.preprocess_images(list(images), mode), **kw)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[..., D]`` -> reconstructed features ``[..., C]``."""
        return self.quantizer.decode(codes.to(self.device))
