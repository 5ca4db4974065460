"""Pixels -> codes for a long-running encoder (an ``asvr-pipeline`` encode actor, a bench loop).

:class:`PixelEncoder` wraps a loaded :class:`~asvr.tokenizer.model.SemanticTokenizer`
with two options that pay off only over many batches:

* ``compile``: the tower goes through ``torch.compile`` once, for one batch shape:
  the first batch's row count.  Smaller batches (the last one, or a batch with
  failed images left out) are padded with zero images and larger ones run in
  pieces of that size, so the tower never recompiles (a new shape would cost the
  compile again: 22 s for SigLIP-so400m on one H200, for 636 vs 519 img/s eager;
  bench/results/gpu_issues_12_13_h200.md).  The padded rows' features are
  dropped before the RVQ, so codes are those of the eager tower up to the
  compiled kernels' rounding (the RVQ is exact for the features it is given).
* ``chunks`` > 1: a batch is cut into that many pieces and, on CUDA, the tower
  runs the next piece on a side stream while the exact RVQ of the current one
  runs on the main stream (its host syncs -- candidate counts, fallback rows --
  leave gaps the encoder fills).  On CPU the pieces run one after the other.
  One H200, six batches of 64, compiled tower + fused RVQ (the first fused
  version): 235.6 img/s sequential, 234.4 overlapped -- both halves were
  compute-bound; ``bench/tokenize_speed.py`` measures it again with the current
  search, and it stays off by default.

torch.compile is the library made for the first job (CUDA graphs or a
TensorRT export would fix the shape the same way but add a dependency and a
build step per tower); the overlap is plain CUDA streams and events.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineOptions:
    compile: bool = False
    """torch.compile the tower once (one batch shape, see module docstring)."""
    compile_backend: str | Callable = "inductor"
    """torch.compile backend (tests use a counting one)."""
    chunks: int = 1
    """Pieces per batch for the encoder/RVQ overlap (1: none)."""

    def __post_init__(self):
        if self.chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {self.chunks}")


class PixelEncoder:
    """float32 pixels ``[N, 3, S, S]`` (on the tokenizer's device) -> codes ``[N, H, W, D]``."""

    def __init__(
        self,
        tok,
        dtype: torch.dtype | None = None,
        search_dtype=None,
        options: EngineOptions | None = None,
    ):
        self.tok = tok
        self.dtype = dtype
        self.search_dtype = search_dtype
        self.options = options or EngineOptions()
        self.tower = tok.encoder
        if self.options.compile:
            self.tower = torch.compile(tok.encoder, backend=self.options.compile_backend, dynamic=False)
        self.rows: int | None = None
        """The one batch shape the compiled tower sees (set by the first call)."""
        self._side = torch.cuda.Stream(device=tok.device) if tok.device.type == "cuda" else None

    # ------------------------------------------------------------------ stages
    def _tower(self, px: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and self.dtype != torch.float32:
            with torch.autocast(device_type=px.device.type, dtype=self.dtype):
                return self.tower(px).float()
        return self.tower(px.float()).float()

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 features ``[N, H, W, C]``; a compiled tower sees ``self.rows`` images a call."""
        n = pixels.shape[0]
        if not self.options.compile:
            return self._tower(pixels)
        if self.rows is None:
            self.rows = n
        rows = self.rows
        out = []
        for s in range(0, n, rows):
            part = pixels[s : s + rows]
            if part.shape[0] < rows:
                pad = part.new_zeros((rows - part.shape[0], *part.shape[1:]))
                part = torch.cat([part, pad])
            out.append(self._tower(part)[: min(rows, n - s)])
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.no_grad()
    def quantize(self, feats: torch.Tensor) -> torch.Tensor:
        return self.tok.quantize(feats, search_dtype=self.search_dtype)

    # ------------------------------------------------------------------ both
    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        chunks = min(self.options.chunks, n)
        if chunks <= 1:
            return self.quantize(self.features(pixels))
        parts = pixels.split(math.ceil(n / chunks))
        if self._side is None:  # CPU: the pieces one after the other
            return torch.cat([self.quantize(self.features(p)) for p in parts])
        main = torch.cuda.current_stream(pixels.device)
        side = self._side
        side.wait_stream(main)  # the pixels were written on the main stream

        def ahead(part: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
            with torch.cuda.stream(side):
                f = self.features(part)
                ev = torch.cuda.Event()
                ev.record(side)
            return f, ev

        nxt = ahead(parts[0])
        out = []
        for i in range(len(parts)):
            cur, ev = nxt
            if i + 1 < len(parts):
                nxt = ahead(parts[i + 1])  # enqueued before this piece's RVQ blocks the host
            main.wait_event(ev)
            cur.record_stream(main)
            out.append(self.quantize(cur))
        pixels.record_stream(side)  # read there: not reused before the side stream is done
        return torch.cat(out)
