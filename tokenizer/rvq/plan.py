"""The knobs of the fused exact-RVQ search (asvr.tokenizer.rvq.fused_triton), without triton or torch.

The quantizer reads a :class:`FusedPlan` per depth; ``search_dtype`` names map to
plans (:data:`NAMED_PLANS`).  None of it changes the codes, only which level of the
search settles each row and how fast (bench/tokenize_speed.py times the choices).
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("bf16x3", "tf32x3", "fp32", "tf32")
TOP = 8
"""Smallest distances kept per row by default: a window holding up to TOP - 1 codes is settled
by the first pass (a power of two: the kernel's slots are a ``tl.arange``)."""
CAP = 64
"""Candidates the collect pass lists per row by default; rows with more go to full float64."""

Tiles = tuple[int, int, int, int, int]
"""(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""


@dataclass(frozen=True)
class FusedPlan:
    """How the quantizer runs the fused search (``ResidualQuantizer.encode(search_dtype=plan)``)."""

    precision: str = "bf16x3"
    """Precision of both passes at the depths before ``deep_from``."""
    deep_precision: str | None = None
    """Precision from depth ``deep_from`` on (None: ``precision`` everywhere)."""
    deep_from: int = 1
    top: int = TOP
    """Nearest values kept per row by the first pass (a power of two, >= 2)."""
    cap: int = CAP
    """Candidates the collect pass lists per row."""
    collect: bool = True
    """False: no collect pass, uncertified rows go straight to the full float64 search
    (for comparison in the bench)."""
    tiles: Tiles | None = None
    """Tile shape of ``precision`` (None: ``rvq_triton.DEFAULT_TILES``)."""
    deep_tiles: Tiles | None = None
    """Tile shape of ``deep_precision``."""

    def __post_init__(self):
        for p in (self.precision, self.deep_precision):
            if p is not None and p not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
        if self.top < 2 or self.top & (self.top - 1):
            raise ValueError(f"top must be a power of two >= 2, got {self.top}")
        if self.cap < 1:
            raise ValueError(f"cap must be >= 1, got {self.cap}")

    def at(self, depth: int) -> tuple[str, Tiles | None]:
        """(precision, tiles) of ``depth``."""
        if self.deep_precision is not None and depth >= self.deep_from:
            return self.deep_precision, self.deep_tiles
        return self.precision, self.tiles


NAMED_PLANS = {f"fused-{p}": FusedPlan(p) for p in PRECISIONS}
"""``search_dtype`` names of the fused search; ``fused-mixed``: bf16x3 at the first depth,
tf32x3 deeper (where tf32x3 certified 0.6-0.97 of the rows on one H200 vs 0.5-0.8)."""
NAMED_PLANS["fused-mixed"] = FusedPlan("bf16x3", deep_precision="tf32x3", deep_from=1)
