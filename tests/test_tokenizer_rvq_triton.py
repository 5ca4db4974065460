"""The fused Triton RVQ search (asvr.tokenizer.rvq_triton), run on CPU by Triton's
interpreter: its nearest-two output against float64, and the quantizer's codes
through it against the float64 numpy reference (random data, near ties, shared
codebooks, tile sizes that do not divide the shapes).  Skipped without triton;
precision on tensor cores is measured on the GPU (bench/gpu_rvq_kernel.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # the interpreter must be chosen before triton is imported (its language module reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from asvr.tokenizer import ResidualQuantizer, rvq_encode_reference  # noqa: E402
from asvr.tokenizer import rvq_triton  # noqa: E402

FUSED = ["fused-bf16x3", "fused-tf32x3", "fused-fp32"]


@pytest.mark.parametrize("precision", ["bf16x3", "tf32x3", "fp32"])
def test_nearest_two_matches_float64(precision):
    rng = np.random.default_rng(0)
    n, k, c = 37, 150, 40  # not multiples of the tiles below: masked edges
    a = torch.from_numpy(rng.standard_normal((n, c)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((k, c)).astype(np.float32))
    norms = (b.double() ** 2).sum(1)
    best, idx, second = rvq_triton.nearest_two(rvq_triton.split_operand(a, precision),
                                               rvq_triton.split_operand(b, precision), norms.float(), precision,
                                               tiles=(16, 32, 16, 4, 2))
    ref = norms[None] - 2 * a.double() @ b.double().T
    top2 = ref.sort(dim=1).values
    err = rvq_triton.delta(precision, c) * 2 * a.double().norm(dim=1) * b.double().norm(dim=1).max() + 1e-5
    assert ((best.double() - top2[:, 0]).abs() <= err).all()
    assert ((second.double() - top2[:, 1]).abs() <= err).all()
    gap = top2[:, 1] - top2[:, 0] > 2 * err
    assert gap.float().mean() > 0.8
    np.testing.assert_array_equal(idx[gap].numpy(), ref.argmin(1)[gap].numpy())


def test_nearest_two_sees_a_duplicate_in_another_tile():
    """The best and second best in different code tiles (and a duplicate: second == best)."""
    rng = np.random.default_rng(1)
    b = rng.standard_normal((96, 24)).astype(np.float32)
    b[80] = b[3]  # exact duplicate, three tiles later
    a = b[[3, 10, 50]] + 0.01 * rng.standard_normal((3, 24)).astype(np.float32)
    bt = torch.from_numpy(b)
    norms = (bt.double() ** 2).sum(1).float()
    best, idx, second = rvq_triton.nearest_two(rvq_triton.split_operand(torch.from_numpy(a), "fp32"),
                                               rvq_triton.split_operand(bt, "fp32"), norms, "fp32",
                                               tiles=(16, 16, 16, 4, 2))
    assert int(idx[0]) in (3, 80) and float(second[0]) == float(best[0])
    assert idx[1:].tolist() == [10, 50] and (second[1:] > best[1:]).all()


@pytest.mark.parametrize("search_dtype", FUSED)
def test_fused_codes_equal_float64_reference(search_dtype):
    rng = np.random.default_rng(2)
    d, k, c, n = 3, 70, 48, 150
    cb = (rng.standard_normal((d, k, c)) * (0.5 ** np.arange(d))[:, None, None]).astype(np.float32)
    x = (cb[0][rng.integers(0, k, n)] + 0.3 * rng.standard_normal((n, c))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert stats.rows == n * d and len(stats.fallback_per_depth) == d
    assert stats.fallback_rows < stats.rows // 4  # most rows certified by the kernel alone


@pytest.mark.parametrize("search_dtype", FUSED)
def test_fused_near_ties_go_down_the_cascade_and_stay_exact(search_dtype):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((16, 40)).astype(np.float32)
    twins = [base + 1e-7 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(2)]
    cb = np.concatenate([base, *twins, base[:1]])[None]  # code 48 duplicates code 0
    cb = np.concatenate([cb, 0.3 * cb], axis=0)
    x = (base[rng.integers(0, 16, 60)] + 0.05 * rng.standard_normal((60, 40))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert stats.fallback_per_depth[0] == 60  # every row has a twin within the window
    assert not (codes[:, 0] == 48).any()


def test_fused_shared_codebook_exact():
    rng = np.random.default_rng(4)
    cb = rng.standard_normal((1, 64, 32)).astype(np.float32)
    x = (cb[0][rng.integers(0, 64, 50)] + 0.5 * rng.standard_normal((50, 32))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb), depth=3)
    codes = q.encode(torch.from_numpy(x), search_dtype="fused-bf16x3")
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, np.repeat(cb, 3, axis=0)))


def test_delta_orders_the_precisions():
    ds = {p: rvq_triton.delta(p, 1152) for p in rvq_triton.PRECISIONS}
    assert ds["fp32"] < ds["tf32x3"] < ds["bf16x3"] < ds["tf32"]
