"""Fused exact-RVQ search: Triton (CUDA or its CPU interpreter), else torch.

Two passes of one kernel (``MODE``), both computing the approximate distances
``||c_k||^2 - 2 r.c_k`` tile by tile on the tensor cores, so the ``[N, K]``
matrix never reaches memory:

* **nearest** (``MODE 0``): per row the ``top`` smallest values and their
  indices (default :data:`TOP` = 8), kept unsorted in registers: a tile's
  smallest value replaces the largest kept one while it is smaller, so after
  the first tiles most rows insert nothing and the epilogue is one row-min per
  tile.  Whatever the tie order, every value not kept is ``>=`` the largest
  kept one, which is all the certification needs (below);
* **collect** (``MODE 1``): for the rows the first pass did not certify, every
  code whose approximate distance is within a per-row ``window``: a count and
  the first ``cap`` indices, in increasing index order (a prefix sum over each
  tile's hits; every program owns its rows, so no atomics and a deterministic
  order).

With the window ``best + 2 * bound`` of the quantizer's module docstring (the
exact argmin's approximate distance is at most ``bound`` above its exact one,
which is at most the approximate best's exact one, itself at most ``bound``
above the approximate best): one kept value in the window certifies the argmin;
two to ``top - 1`` with the largest kept one outside are the complete
candidate list, re-ranked in float64; otherwise the collect pass lists the
window (it computes the distances again, with the same ``delta``, so the exact
argmin's approximate value is in the window again) and those candidates are
re-ranked in float64, up to ``cap`` of them; only rows with more than ``cap``
codes in the window go to a full float64 search.  This replaces the cascade of
the first version (four nearest, then an fp32 ``[n, K]`` cuBLAS search of the
uncertified rows, up to 47% of them at depth 7 on random-SigLIP features, then
float64), which cost ~180 ms of a 260 ms batch on one H200.

Precisions (``PREC``), all with fp32 accumulation:

* ``bf16x3``: each fp32 operand is split ``a = hi + lo`` into two bf16 and the
  product is ``hi*hi + hi*lo + lo*hi`` (three bf16 MMAs): relative error
  ``3 * 2^-16`` per product (the dropped ``lo*lo`` and the rounding of ``lo``);
* ``tf32x3``: Triton's built-in three-pass tf32 (``3 * 2^-22``);
* ``fp32``: plain fp32 FMAs on the CUDA cores (``input_precision="ieee"``);
* ``tf32``: one tf32 MMA (``2 * 2^-11``), for comparison only.

Tensor-core accumulation is not IEEE round-to-nearest (it may truncate), so
the accumulation error is modelled with the truncation unit ``2^-23`` over the
``passes * C`` products as a random walk (four standard deviations), which is
what :func:`delta` returns with the split error.  ``bench/gpu_rvq_kernel.py``
measures the largest observed error of each precision on the GPU against that
model (``WRITE_D`` variant that stores the tile distances of a sample).

:class:`FusedPlan` holds the knobs (precision per depth: bf16x3 at the first
depth and tf32x3 deeper is ``search_dtype="fused-mixed"``, where tf32x3
certified 0.6-0.97 of the rows vs 0.5-0.8 for bf16x3; ``top``, ``cap``, tile
shapes); ``bench/tokenize_speed.py`` times them.

Measured on one H200 (bench/results/gpu_issues_12_13_h200.md; the first
version: four nearest, four insertions per tile), one depth of 46656 x 16384 x
1152: bf16x3 10.2 ms (173 TFLOP/s counted as 2NKC; tiles 128x128x64, 8 warps,
3 stages) vs 39.0 ms for cuBLAS fp32 distances + min; tf32x3 24.5 ms, fp32 150
ms, one-pass tf32 10.0 ms (as fast as bf16x3: the epilogue and loads bound the
kernel, not the MMAs; hence the early-exit epilogue here).  Observed error /
model: bf16x3 0.075, tf32x3 0.009, fp32 0.086 (tf32 0.69, hence comparison
only).  This version (top 8, collect pass, early exit) is not measured on a GPU
yet (no device in the session that wrote it): run ``bench/tokenize_speed.py``.
"""

from __future__ import annotations

import math
import os

import torch

from asvr.tokenizer.rvq.plan import CAP, PRECISIONS, TOP, FusedPlan, Tiles

try:  # optional: the `gpu` extra; the quantizer falls back to its torch paths without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

__all__ = ["CAP", "PRECISIONS", "TOP", "FusedPlan", "Tiles", "collect", "delta", "nearest", "split_operand"]
_PREC_ID = {p: i for i, p in enumerate(PRECISIONS)}
# (relative error of one product from operand splitting, number of MMA passes)
_SPLIT = {"bf16x3": (3 * 2.0**-16, 3), "tf32x3": (3 * 2.0**-22, 3), "fp32": (0.0, 1), "tf32": (2 * 2.0**-11, 1)}


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def delta(precision: str, dim: int) -> float:
    """Relative error bound of one approximate dot product ``r.c`` (against
    ``||r|| ||c||``): fp32 rounding of both operands (``2 * 2^-24``), the split
    error of ``precision`` and the accumulation model (module docstring)."""
    split, passes = _SPLIT[precision]
    return 2 * 2.0**-24 + split + 4 * math.sqrt(passes * dim) * 2.0**-23


if tl is not None:  # the kernel is defined only where triton imports
    # one Triton kernel is one compiled unit over a register tile: its loads, masks and stores are
    # read together, so it stays one function (outside the function budget, issue 21)
    def _fused(  # noqa: C901, PLR0912, PLR0915
        A_HI,
        A_LO,
        B_HI,
        B_LO,
        NORM,
        WIN,
        VALS,
        IDS,
        COUNT,
        D_OUT,
        N,
        stride_a,
        stride_b,
        K: tl.constexpr,
        C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        MODE: tl.constexpr,
        SLOTS: tl.constexpr,
        WRITE_D: tl.constexpr,
    ):
        """MODE 0: the SLOTS smallest per row -> VALS, IDS [N, SLOTS] (unsorted).
        MODE 1: codes with distance <= WIN[row] -> COUNT [N], the first SLOTS of them -> IDS."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        lane = tl.arange(0, BLOCK_N)
        if MODE == 0:
            slot = tl.arange(0, SLOTS)
            kv = tl.full([BLOCK_M, SLOTS], float("inf"), tl.float32)
            ki = tl.zeros([BLOCK_M, SLOTS], tl.int32)
        else:
            win = tl.load(WIN + rows, mask=rmask, other=float("-inf"))
            base = tl.zeros([BLOCK_M], tl.int32)
        for n0 in range(0, K, BLOCK_N):
            cols = n0 + lane
            cmask = cols < K
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, C, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < C
                a_off = rows[:, None] * stride_a + ks[None, :]
                b_off = cols[None, :] * stride_b + ks[:, None]
                am = rmask[:, None] & kmask[None, :]
                bm = kmask[:, None] & cmask[None, :]
                a = tl.load(A_HI + a_off, mask=am, other=0.0)
                b = tl.load(B_HI + b_off, mask=bm, other=0.0)
                if PREC == 0:  # bf16x3: small terms first
                    a_lo = tl.load(A_LO + a_off, mask=am, other=0.0)
                    b_lo = tl.load(B_LO + b_off, mask=bm, other=0.0)
                    acc = tl.dot(a_lo, b, acc)
                    acc = tl.dot(a, b_lo, acc)
                    acc = tl.dot(a, b, acc)
                elif PREC == 1:
                    acc = tl.dot(a, b, acc, input_precision="tf32x3")
                elif PREC == 2:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc, input_precision="tf32")
            nrm = tl.load(NORM + cols, mask=cmask, other=float("inf"))
            d = nrm[None, :] - 2.0 * acc
            d = tl.where(cmask[None, :], d, float("inf"))
            if WRITE_D:
                tl.store(D_OUT + rows[:, None] * K + cols[None, :], d, mask=rmask[:, None] & cmask[None, :])
            if MODE == 0:
                # the tile's smallest replaces the largest kept while smaller; rows stop one by one
                # (extracted values grow, the largest kept shrinks), the tile when no row improves
                m, j = tl.min(d, axis=1, return_indices=True)
                vmax, jmax = tl.max(kv, axis=1, return_indices=True)
                go = m < vmax
                while tl.max(go.to(tl.int32), axis=0) > 0:
                    put = go[:, None] & (slot[None, :] == jmax[:, None])
                    kv = tl.where(put, m[:, None], kv)
                    ki = tl.where(put, (n0 + j)[:, None], ki)
                    d = tl.where(lane[None, :] == j[:, None], float("inf"), d)
                    m, j = tl.min(d, axis=1, return_indices=True)
                    vmax, jmax = tl.max(kv, axis=1, return_indices=True)
                    go = m < vmax
            else:
                hit = (d <= win[:, None]) & cmask[None, :]
                pos = base[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
                keep = hit & (pos < SLOTS) & rmask[:, None]
                tl.store(IDS + rows[:, None] * SLOTS + pos, cols[None, :], mask=keep)
                base += tl.sum(hit.to(tl.int32), axis=1)
        if MODE == 0:
            out = rows[:, None] * SLOTS + slot[None, :]
            tl.store(VALS + out, kv, mask=rmask[:, None])
            tl.store(IDS + out, ki, mask=rmask[:, None])
        else:
            tl.store(COUNT + rows, base, mask=rmask)


_KERNELS: dict = {}


def _kernel():
    """JIT the kernel on first use, so ``TRITON_INTERPRET`` is read then (tests set it)."""
    key = interpreting()
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(_fused)
    return _KERNELS[key]


def split_operand(x32: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[R, C]`` -> the kernel's operands (hi, lo): two bf16 for bf16x3, else (x, x)."""
    x32 = x32.float().contiguous()
    if precision != "bf16x3":
        return x32, x32
    hi = x32.bfloat16()
    lo = (x32 - hi.float()).bfloat16()
    if interpreting():  # the interpreter's bf16 dot is wrong (numpy has no bf16): the same values in fp32,
        return hi.float().contiguous(), lo.float().contiguous()  # whose products are exact there too
    return hi.contiguous(), lo.contiguous()


# tiles per precision: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); bench/gpu_rvq_kernel.py
# and bench/tokenize_speed.py time alternatives on the GPU
DEFAULT_TILES: dict[str, Tiles] = {
    "bf16x3": (128, 128, 64, 8, 3),
    "tf32x3": (128, 128, 32, 8, 3),
    "fp32": (64, 64, 32, 4, 2),
    "tf32": (128, 128, 32, 8, 3),
}


def _use_torch(a: torch.Tensor) -> bool:
    return triton is None or (a.device.type != "cuda" and not interpreting())


def _torch_distances(a, b, norms: torch.Tensor, precision: str) -> torch.Tensor:
    """What the kernel computes, in torch with the [N, K] matrix (CPU without triton, or no
    interpreter): the same split products for bf16x3 (exact in fp32, as on the tensor cores);
    fp32 products for the others, whose error is within their (larger) bound.  Keeps the
    quantizer's certification and re-rank testable on any machine."""
    a_hi, a_lo = (t.float() for t in a)
    b_hi, b_lo = (t.float() for t in b)
    dots = a_hi @ b_hi.T
    if precision == "bf16x3":
        dots = a_lo @ b_hi.T + a_hi @ b_lo.T + dots
    return norms.float()[None] - 2 * dots


def _nearest_torch(a, b, norms: torch.Tensor, precision: str, write_distances: bool, top: int = TOP):
    dist = _torch_distances(a, b, norms, precision)
    k = min(top, dist.shape[1])
    vals, ids = dist.topk(k, dim=1, largest=False, sorted=True)
    if k < top:  # fewer codes than kept slots: the kernel leaves inf there
        pad = top - k
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("inf"))], dim=1)
        ids = torch.cat([ids, ids.new_zeros((ids.shape[0], pad))], dim=1)
    return (vals, ids, dist) if write_distances else (vals, ids)


def _launch(a, b, norms, precision, tiles, mode, slots, window=None, write_distances=False):
    if precision not in _PREC_ID:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    a_hi, a_lo = a
    b_hi, b_lo = b
    n, c = a_hi.shape
    k = b_hi.shape[0]
    bm, bn, bk, warps, stages = tiles or DEFAULT_TILES[precision]
    dev = a_hi.device
    vals = torch.empty((n, slots) if mode == 0 else (1,), dtype=torch.float32, device=dev)
    ids = torch.full((n, slots), -1, dtype=torch.int32, device=dev)
    count = torch.empty((n,) if mode == 1 else (1,), dtype=torch.int32, device=dev)
    dist = torch.empty((n, k) if write_distances else (1,), dtype=torch.float32, device=dev)
    win = window.float().contiguous() if window is not None else vals
    extra = {} if interpreting() else {"num_warps": warps, "num_stages": stages}
    if n:
        _kernel()[(triton.cdiv(n, bm),)](
            a_hi,
            a_lo,
            b_hi,
            b_lo,
            norms.float().contiguous(),
            win,
            vals,
            ids,
            count,
            dist,
            n,
            a_hi.stride(0),
            b_hi.stride(0),
            K=k,
            C=c,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            PREC=_PREC_ID[precision],
            MODE=mode,
            SLOTS=slots,
            WRITE_D=write_distances,
            **extra,
        )
    return vals, ids, count, dist


def nearest(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    norms: torch.Tensor,
    precision: str,
    tiles: Tiles | None = None,
    write_distances: bool = False,
    top: int = TOP,
):
    """Per row of ``a`` [N, C] (split as :func:`split_operand`): the ``top`` smallest of
    ``norms[k] - 2 a.b_k`` over the rows of ``b`` [K, C], ascending, and their indices
    (``inf`` and index 0 in the slots beyond K).  Among equal values the order is not
    specified.  -> (values fp32 [N, top], indices int64 [N, top] [, the distances [N, K]
    when ``write_distances``: a measuring aid])."""
    if precision not in _PREC_ID:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if top < 2 or top & (top - 1):
        raise ValueError(f"top must be a power of two >= 2, got {top}")
    if _use_torch(a[0]):
        return _nearest_torch(a, b, norms, precision, write_distances, top)
    vals, ids, _, dist = _launch(a, b, norms, precision, tiles, 0, top, write_distances=write_distances)
    vals, order = vals.sort(dim=1)
    ids = ids.long().gather(1, order).clamp_min(0)
    if write_distances:
        return vals, ids, dist
    return vals, ids


def collect(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    norms: torch.Tensor,
    window: torch.Tensor,
    precision: str,
    cap: int = CAP,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``a``: how many codes have ``norms[k] - 2 a.b_k <= window[row]`` (fp32,
    computed as :func:`nearest` does), and the first ``cap`` of their indices in increasing
    order (-1 beyond the count).  -> (count int64 [N], indices int64 [N, cap])."""
    if _use_torch(a[0]):
        hit = _torch_distances(a, b, norms, precision) <= window.float()[:, None]
        count = hit.sum(dim=1)
        k = hit.shape[1]
        pos = torch.where(hit, torch.arange(k, device=hit.device)[None, :], k)
        first = pos.sort(dim=1).values[:, :cap]
        if first.shape[1] < cap:
            first = torch.cat([first, first.new_full((first.shape[0], cap - first.shape[1]), k)], dim=1)
        return count, torch.where(first < k, first, -1)
    _, ids, count, _ = _launch(a, b, norms, precision, tiles, 1, cap, window=window)
    return count.long(), ids.long()
