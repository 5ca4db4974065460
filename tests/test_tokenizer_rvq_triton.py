"""The fused Triton RVQ search (asvr.tokenizer.rvq.fused_triton), run on CPU by Triton's
interpreter: its nearest-``top`` output against float64, and the quantizer's codes
through it against the float64 numpy reference (random data, near ties, shared
codebooks, tile sizes that do not divide the shapes).  Without triton the kernel
tests skip and the quantizer tests run its torch stand-in (same certification
and re-rank); precision on tensor cores is measured on the GPU
(bench/gpu_rvq_kernel.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # the interpreter must be chosen before triton is imported (its language module reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference  # noqa: E402
from asvr.tokenizer.rvq import fused_triton as rvq_triton  # noqa: E402

needs_triton = pytest.mark.skipif(not rvq_triton.available(), reason="triton not installed (asvr[gpu])")

FUSED = ["fused-bf16x3", "fused-tf32x3", "fused-fp32"]


@needs_triton
@pytest.mark.parametrize("precision,top", [("bf16x3", 8), ("tf32x3", 4), ("fp32", 8)])
def test_nearest_top_match_float64(precision, top):
    rng = np.random.default_rng(0)
    n, k, c = 37, 150, 40  # not multiples of the tiles below: masked edges
    a = torch.from_numpy(rng.standard_normal((n, c)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((k, c)).astype(np.float32))
    norms = (b.double() ** 2).sum(1)
    vals, ids = rvq_triton.nearest(
        rvq_triton.split_operand(a, precision),
        rvq_triton.split_operand(b, precision),
        norms.float(),
        precision,
        tiles=(16, 32, 16, 4, 2),
        top=top,
    )
    ref = norms[None] - 2 * a.double() @ b.double().T
    srt, order = ref.sort(dim=1)
    err = rvq_triton.delta(precision, c) * 2 * a.double().norm(dim=1) * b.double().norm(dim=1).max() + 1e-5
    assert ((vals.double() - srt[:, :top]).abs() <= err[:, None]).all()
    assert (vals[:, 1:] >= vals[:, :-1]).all()  # sorted
    # each kept index holds the value reported for it, and ids are distinct
    np.testing.assert_allclose(ref.gather(1, ids).numpy(), vals.double().numpy(), atol=float(err.max()))
    assert all(len(set(row)) == top for row in ids.tolist())
    gap = srt[:, 1] - srt[:, 0] > 2 * err
    assert gap.float().mean() > 0.8
    np.testing.assert_array_equal(ids[gap, 0].numpy(), order[gap, 0].numpy())


@needs_triton
def test_nearest_four_across_tiles_and_duplicates():
    """The four smallest spread over different code tiles, with an exact duplicate (top 4:
    a later tile must replace kept values)."""
    rng = np.random.default_rng(1)
    b = rng.standard_normal((96, 24)).astype(np.float32)
    b[80] = b[3]  # exact duplicate, four tiles later
    b[40] = b[3] + 1e-3
    b[95] = b[3] + 2e-3
    a = b[[3, 10]] + 0.01 * rng.standard_normal((2, 24)).astype(np.float32)
    bt = torch.from_numpy(b)
    norms = (bt.double() ** 2).sum(1).float()
    vals, ids = rvq_triton.nearest(
        rvq_triton.split_operand(torch.from_numpy(a), "fp32"),
        rvq_triton.split_operand(bt, "fp32"),
        norms,
        "fp32",
        tiles=(16, 16, 16, 4, 2),
        top=4,
    )
    assert set(ids[0].tolist()) == {3, 80, 40, 95} and float(vals[0, 0]) == float(vals[0, 1])
    assert int(ids[1, 0]) == 10 and (vals[1, 1:] > vals[1, 0]).all()


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
def test_fused_two_or_three_twins_are_reranked_in_the_kernel_level(search_dtype):
    """Codes with one or two twins 1e-7 away: the window holds 2-3 codes, all kept by
    the kernel, so the float64 re-rank settles them without the collect pass."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((24, 32)).astype(np.float32)
    t1 = base + 1e-7 * rng.standard_normal(base.shape).astype(np.float32)
    t2 = base[:12] + 1e-7 * rng.standard_normal((12, 32)).astype(np.float32)
    cb = np.concatenate([base, t1, t2])[None]
    x = (base[rng.integers(0, 24, 80)] + 0.05 * rng.standard_normal((80, 32))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert stats.fallback_rows == 0


@pytest.mark.parametrize("search_dtype", FUSED)
def test_fused_near_ties_go_down_the_cascade_and_stay_exact(search_dtype):
    """Eight twins per code: more than the first pass keeps, so every row at depth 0 goes to
    the collect pass, which settles it (at most 64 codes in the window): no full search."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((16, 40)).astype(np.float32)
    twins = [base + 1e-7 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(8)]
    cb = np.concatenate([base, *twins, base[:1]])[None]  # code 144 duplicates code 0
    cb = np.concatenate([cb, 0.3 * cb], axis=0)
    x = (base[rng.integers(0, 16, 60)] + 0.05 * rng.standard_normal((60, 40))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert stats.fallback_per_depth[0] == 60  # every row has 8 twins within the window: more than kept
    assert stats.collected_per_depth[0] == 60 and stats.full_rows == 0
    assert not (codes[:, 0] == 144).any()


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


@needs_triton
@pytest.mark.parametrize("precision", ["bf16x3", "fp32"])
def test_kernel_equals_its_torch_stand_in(precision):
    rng = np.random.default_rng(6)
    a = torch.from_numpy(rng.standard_normal((21, 40)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((70, 40)).astype(np.float32))
    norms = (b.double() ** 2).sum(1).float()
    ops = rvq_triton.split_operand(a, precision), rvq_triton.split_operand(b, precision)
    vals, ids = rvq_triton.nearest(*ops, norms, precision, tiles=(16, 32, 16, 4, 2))
    tv, ti = rvq_triton._nearest_torch(*ops, norms, precision, False)
    assert vals.shape == (21, rvq_triton.TOP)
    np.testing.assert_allclose(vals.numpy(), tv.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(ids[:, 0].numpy(), ti[:, 0].numpy())
