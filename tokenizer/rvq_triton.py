"""Fused nearest-four search for the exact RVQ: Triton (CUDA or its CPU interpreter), else torch.

One launch per depth computes, for every row ``r`` of a block, the approximate
distances ``||c_k||^2 - 2 r.c_k`` tile by tile on the tensor cores and keeps in
registers only the four smallest values and their indices (each tile's four
smallest go through a small insertion network): the ``[N, K]`` distance matrix
never reaches memory, and the argmin, the certification window count and the
candidate list of ``ResidualQuantizer`` come out of the same pass.  With the
window ``best + 2 * bound`` of the quantizer's module docstring: one value in
it certifies the argmin; two or three (the fourth outside) are the complete
candidate list, re-ranked in float64; otherwise the row goes down the
quantizer's cascade (fp32 candidate search, then full float64), so codes stay
equal to the float64 reference whatever this kernel's precision.

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

Measured on one H200 (bench/results/gpu_issues_12_13_h200.md), one depth of
46656 x 16384 x 1152: bf16x3 10.2 ms (173 TFLOP/s counted as 2NKC; tiles
128x128x64, 8 warps, 3 stages) vs 39.0 ms for cuBLAS fp32 distances + min;
tf32x3 24.5 ms, fp32 150 ms, one-pass tf32 10.0 ms (as fast as bf16x3: the
epilogue and loads bound the kernel, not the MMAs).  Observed error / model:
bf16x3 0.075, tf32x3 0.009, fp32 0.086 (tf32 0.69, hence comparison only).
Share of rows the kernel level settles on random-SigLIP features falls with
depth (bf16x3 1.00 -> 0.53, tf32x3 1.00 -> 0.60); the 8-depth RVQ runs at 245
img/s (bf16x3) vs 152 for the fp32 cascade, codes identical.
"""

import math
import os

import torch

try:  # optional: the `gpu` extra; the quantizer falls back to its torch paths without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

PRECISIONS = ("bf16x3", "tf32x3", "fp32", "tf32")
TOP = 4
"""Smallest distances kept per row: a window holding up to TOP - 1 codes is certified."""
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

    def _nn4(
        A_HI,
        A_LO,
        B_HI,
        B_LO,
        NORM,
        VALS,
        IDS,
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
        WRITE_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        lane = tl.arange(0, BLOCK_N)
        # the four smallest so far, sorted: (v0, i0) <= (v1, i1) <= (v2, i2) <= (v3, i3)
        v0 = tl.full([BLOCK_M], float("inf"), tl.float32)
        v1 = tl.full([BLOCK_M], float("inf"), tl.float32)
        v2 = tl.full([BLOCK_M], float("inf"), tl.float32)
        v3 = tl.full([BLOCK_M], float("inf"), tl.float32)
        i0 = tl.zeros([BLOCK_M], tl.int32)
        i1 = tl.zeros([BLOCK_M], tl.int32)
        i2 = tl.zeros([BLOCK_M], tl.int32)
        i3 = tl.zeros([BLOCK_M], tl.int32)
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
            # the tile's four smallest, each inserted into the sorted four (a small insertion network)
            for _r in tl.static_range(4):
                m, j = tl.min(d, axis=1, return_indices=True)
                d = tl.where(lane[None, :] == j[:, None], float("inf"), d)
                g = n0 + j
                c0 = m < v0
                c1 = m < v1
                c2 = m < v2
                c3 = m < v3
                v3 = tl.where(c2, v2, tl.where(c3, m, v3))
                i3 = tl.where(c2, i2, tl.where(c3, g, i3))
                v2 = tl.where(c1, v1, tl.where(c2, m, v2))
                i2 = tl.where(c1, i1, tl.where(c2, g, i2))
                v1 = tl.where(c0, v0, tl.where(c1, m, v1))
                i1 = tl.where(c0, i0, tl.where(c1, g, i1))
                v0 = tl.where(c0, m, v0)
                i0 = tl.where(c0, g, i0)
        tl.store(VALS + rows * 4, v0, mask=rmask)
        tl.store(VALS + rows * 4 + 1, v1, mask=rmask)
        tl.store(VALS + rows * 4 + 2, v2, mask=rmask)
        tl.store(VALS + rows * 4 + 3, v3, mask=rmask)
        tl.store(IDS + rows * 4, i0, mask=rmask)
        tl.store(IDS + rows * 4 + 1, i1, mask=rmask)
        tl.store(IDS + rows * 4 + 2, i2, mask=rmask)
        tl.store(IDS + rows * 4 + 3, i3, mask=rmask)


_KERNELS: dict = {}


def _kernel():
    """JIT the kernel on first use, so ``TRITON_INTERPRET`` is read then (tests set it)."""
    key = interpreting()
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(_nn4)
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
# times alternatives on the GPU
DEFAULT_TILES = {
    "bf16x3": (128, 128, 64, 8, 3),
    "tf32x3": (128, 128, 32, 8, 3),
    "fp32": (64, 64, 32, 4, 2),
    "tf32": (128, 128, 32, 8, 3),
}


def _nearest_torch(a, b, norms: torch.Tensor, precision: str, write_distances: bool):
    """What the kernel computes, in torch with the [N, K] matrix (CPU without triton, or no
    interpreter): the same split products for bf16x3 (exact in fp32, as on the tensor cores);
    fp32 products for the others, whose error is within their (larger) bound.  Keeps the
    quantizer's certification and re-rank testable on any machine."""
    a_hi, a_lo = (t.float() for t in a)
    b_hi, b_lo = (t.float() for t in b)
    dots = a_hi @ b_hi.T
    if precision == "bf16x3":
        dots = a_lo @ b_hi.T + a_hi @ b_lo.T + dots
    dist = norms.float()[None] - 2 * dots
    k = min(TOP, dist.shape[1])
    vals, ids = dist.topk(k, dim=1, largest=False, sorted=True)
    if k < TOP:  # fewer codes than kept slots: the kernel leaves inf there
        pad = TOP - k
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("inf"))], dim=1)
        ids = torch.cat([ids, ids.new_zeros((ids.shape[0], pad))], dim=1)
    return (vals, ids, dist) if write_distances else (vals, ids)


def nearest(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    norms: torch.Tensor,
    precision: str,
    tiles: tuple[int, int, int, int, int] | None = None,
    write_distances: bool = False,
):
    """Per row of ``a`` [N, C] (split as :func:`split_operand`): the :data:`TOP` smallest
    of ``norms[k] - 2 a.b_k`` over the rows of ``b`` [K, C], ascending, and their
    indices.  -> (values fp32 [N, TOP], indices int64 [N, TOP] [, the distances
    [N, K] when ``write_distances``: a measuring aid])."""
    if precision not in _PREC_ID:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if triton is None or (a[0].device.type != "cuda" and not interpreting()):
        return _nearest_torch(a, b, norms, precision, write_distances)
    a_hi, a_lo = a
    b_hi, b_lo = b
    n, c = a_hi.shape
    k = b_hi.shape[0]
    bm, bn, bk, warps, stages = tiles or DEFAULT_TILES[precision]
    dev = a_hi.device
    vals = torch.empty((n, TOP), dtype=torch.float32, device=dev)
    ids = torch.empty((n, TOP), dtype=torch.int32, device=dev)
    dist = torch.empty((n, k) if write_distances else (1,), dtype=torch.float32, device=dev)
    extra = {} if interpreting() else {"num_warps": warps, "num_stages": stages}
    _kernel()[(triton.cdiv(n, bm),)](
        a_hi,
        a_lo,
        b_hi,
        b_lo,
        norms.float().contiguous(),
        vals,
        ids,
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
        WRITE_D=write_distances,
        **extra,
    )
    if write_distances:
        return vals, ids.long(), dist
    return vals, ids.long()
