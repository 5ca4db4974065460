"""The fused search's second pass (``rvq_triton.collect``) and the plans of the fused search
(``rvq_plan.FusedPlan``), run on CPU by Triton's interpreter (tiny shapes): the listed
window against float64 distances, the bound of the kernel's distances against float64 on
near ties at every depth, and codes against the float64 numpy reference through every
level (first pass, collect pass, full float64 past ``cap``).  Without triton the kernel
tests skip and the quantizer tests run the torch stand-in (same certification)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    # the interpreter must be chosen before triton is imported (its language module reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference  # noqa: E402
from asvr.tokenizer.rvq import fused_triton as rvq_triton  # noqa: E402
from asvr.tokenizer.rvq.plan import NAMED_PLANS, FusedPlan  # noqa: E402

needs_triton = pytest.mark.skipif(not rvq_triton.available(), reason="triton not installed (asvr[gpu])")
TILES = (16, 32, 16, 4, 2)


def _twins(seed: int, copies: int, k_base: int = 12, c: int = 24, n: int = 40, spread: float = 1e-7):
    """``copies`` near twins of each base code (a window of ``copies + 1`` codes per row)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((k_base, c)).astype(np.float32)
    books = [base] + [base + spread * rng.standard_normal(base.shape).astype(np.float32) for _ in range(copies)]
    cb = np.concatenate(books)
    x = (base[rng.integers(0, k_base, n)] + 0.05 * rng.standard_normal((n, c))).astype(np.float32)
    return x, cb


@needs_triton
@pytest.mark.parametrize("precision", ["bf16x3", "fp32"])
def test_collect_lists_the_window_in_index_order(precision):
    """Every code whose float64 distance is clearly inside the window is listed, none clearly
    outside is, in increasing index order, across code tiles; -1 past the count; a cap
    smaller than the count keeps the first ``cap`` and still counts them all."""
    x, cb = _twins(0, copies=9, k_base=10, c=20, n=23)  # K = 100: four code tiles of 32
    a, b = torch.from_numpy(x), torch.from_numpy(cb)
    norms = (b.double() ** 2).sum(1)
    exact = norms[None] - 2 * a.double() @ b.double().T
    err = rvq_triton.delta(precision, 20) * 2 * a.double().norm(dim=1) * b.double().norm(dim=1).max() + 1e-6
    window = exact.min(1).values + 3 * err  # holds each row's 10 twins, well away from other codes
    ops_a, ops_b = rvq_triton.split_operand(a, precision), rvq_triton.split_operand(b, precision)
    count, ids = rvq_triton.collect(ops_a, ops_b, norms.float(), window.float(), precision, cap=16, tiles=TILES)
    for i in range(len(x)):
        surely_in = set(torch.nonzero(exact[i] <= window[i] - err[i]).squeeze(1).tolist())
        maybe = set(torch.nonzero(exact[i] <= window[i] + err[i]).squeeze(1).tolist())
        listed = ids[i, : int(count[i])].tolist()
        assert surely_in <= set(listed) <= maybe and len(surely_in) == 10
        assert listed == sorted(listed) and (ids[i, int(count[i]) :] == -1).all()
    few, first = rvq_triton.collect(ops_a, ops_b, norms.float(), window.float(), precision, cap=4, tiles=TILES)
    assert torch.equal(few, count) and torch.equal(first, ids[:, :4])
    # the torch stand-in agrees on the same inputs
    tc, ti = _torch_collect(ops_a, ops_b, norms, window, precision)
    assert torch.equal(tc, count) and torch.equal(ti, ids)


def _torch_collect(ops_a, ops_b, norms, window, precision, cap=16):
    env = os.environ.pop("TRITON_INTERPRET")  # CPU tensors without the interpreter: the torch stand-in
    try:
        return rvq_triton.collect(ops_a, ops_b, norms.float(), window.float(), precision, cap=cap)
    finally:
        os.environ["TRITON_INTERPRET"] = env


@needs_triton
def test_nearest_early_exit_keeps_the_smallest_whatever_the_code_order():
    """Codes sorted by decreasing distance: every tile improves every row (the epilogue's loop
    runs its longest), then increasing: after the first tile nothing improves.  Same set."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((96, 16)).astype(np.float32))
    d0 = ((b.double() ** 2).sum(1) - 2 * b.double() @ a[0].double()).numpy()
    for order in (np.argsort(-d0), np.argsort(d0)):
        bo = b[torch.from_numpy(order.copy())]
        norms = (bo.double() ** 2).sum(1).float()
        ops = rvq_triton.split_operand(a, "fp32"), rvq_triton.split_operand(bo, "fp32")
        vals, ids = rvq_triton.nearest(*ops, norms, "fp32", tiles=(16, 16, 16, 4, 2), top=8)
        ref = norms.double()[None] - 2 * a.double() @ bo.double().T
        want = ref.sort(dim=1).values[:, :8]
        np.testing.assert_allclose(vals.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-4)
        assert set(order[ids[0].numpy()]) == set(np.argsort(d0)[:8])


@pytest.mark.parametrize("name", ["fused-bf16x3", "fused-tf32x3", "fused-mixed"])
def test_collect_pass_settles_windows_wider_than_top(name):
    """Ten codes per window, top 8: no row is settled by the first pass, all by the collect
    pass (cap 64), none needs the full float64 search; codes equal the float64 reference."""
    x, cb = _twins(2, copies=9)
    cb2 = np.stack([cb, 0.3 * cb])
    q = ResidualQuantizer(torch.from_numpy(cb2))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=name, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb2))
    assert stats.fallback_per_depth[0] == len(x) and stats.collected_per_depth[0] == len(x)
    assert stats.full_rows == 0


def test_windows_past_the_cap_go_to_full_float64_and_stay_exact():
    """cap 4 < the ten codes in each window: the collect pass lists but cannot settle them."""
    x, cb = _twins(3, copies=9)
    q = ResidualQuantizer(torch.from_numpy(cb[None]))
    plan = FusedPlan("bf16x3", top=4, cap=4, tiles=TILES)
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=plan, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb[None]))
    assert stats.full_rows == len(x) and stats.collected_per_depth == (0,)
    no_collect = FusedPlan("bf16x3", collect=False)
    codes2, stats2 = q.encode(torch.from_numpy(x), search_dtype=no_collect, return_stats=True)
    np.testing.assert_array_equal(codes2.numpy(), codes.numpy())
    assert stats2.full_rows == len(x)


@st.composite
def _near_ties(draw):
    """Depth 2-3 codebooks of near-tied clusters (1e-3 .. 1e-6 apart, clusters of 2-12 codes:
    windows of every width around ``top``) on a large common offset, features near a code."""
    seed = draw(st.integers(0, 2**31 - 1))
    depth = draw(st.integers(2, 3))
    k = draw(st.sampled_from([24, 48]))
    c = draw(st.sampled_from([8, 33]))
    spread = draw(st.sampled_from([1e-3, 1e-5, 1e-6]))
    cluster = draw(st.sampled_from([2, 6, 12]))
    offset = draw(st.sampled_from([0.0, 300.0]))
    rng = np.random.default_rng(seed)
    books = [rng.standard_normal((k, c))]
    for _ in range(1, depth):
        centres = rng.standard_normal((max(1, k // cluster), c))
        near = centres[np.arange(k) % len(centres)] + spread * rng.standard_normal((k, c))
        books.append(offset + 0.1 * near)
    cb = np.stack(books).astype(np.float32)
    n = 32
    x = cb[0][rng.integers(0, k, n)].astype(np.float64)
    for d in range(1, depth):
        x += cb[d][rng.integers(0, k, n)] * rng.choice([0.0, 1.0], n)[:, None]
    x += 0.05 * spread * rng.standard_normal(x.shape)
    return x.astype(np.float32), cb


PLANS = [
    FusedPlan("bf16x3", top=2, cap=8, tiles=TILES),
    FusedPlan("tf32x3", top=4, cap=3, tiles=TILES),
    FusedPlan("bf16x3", deep_precision="fp32", top=8, cap=64, tiles=TILES, deep_tiles=TILES),
]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(_near_ties(), st.sampled_from(PLANS))
def test_bound_and_codes_on_near_ties_through_both_passes(data, plan):
    """The kernel's distances (the ones both passes compare, ``WRITE_D``) stay within the
    quantizer's bound of float64 at every depth, on the residuals the reference sees; the
    collect pass lists the exact argmin of every row it is asked about; codes equal the
    float64 reference whichever level settles a row."""
    x, cb = data
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=plan, return_stats=True)
    ref = rvq_encode_reference(x, cb)
    np.testing.assert_array_equal(codes.numpy(), ref)
    if not rvq_triton.available():
        return
    r = torch.from_numpy(x.astype(np.float64))
    prepared = q._prepared(r.device)
    for d in range(cb.shape[0]):
        prec, tiles = plan.at(d)
        p = prepared[d]
        rc = r - p["mean"]
        a_ops = rvq_triton.split_operand(rc.float(), prec)
        b_ops = rvq_triton.split_operand(p["b64"].float(), prec)
        vals, ids, dist = rvq_triton.nearest(a_ops, b_ops, p["n32"], prec, tiles=tiles, write_distances=True)
        exact = p["n64"][None] - 2 * rc @ p["b64"].T
        rn = rc.norm(dim=1)
        bound = 2 * rvq_triton.delta(prec, cb.shape[2]) * rn * p["cmax"] + 2.0**-22 * (
            p["cmax"] ** 2 + 2 * rn * p["cmax"]
        )
        assert ((dist.double() - exact).abs() <= bound[:, None]).all()
        window = torch.nextafter((vals[:, 0].double() + 2 * bound).float(), torch.tensor(float("inf")))
        count, listed = rvq_triton.collect(a_ops, b_ops, p["n32"], window, prec, cap=cb.shape[1], tiles=tiles)
        truth = torch.from_numpy(ref[:, d])
        assert (listed == truth[:, None]).any(dim=1).all()  # the exact argmin is always in the window
        assert (count >= 1).all()
        r = r - torch.from_numpy(cb[d].astype(np.float64))[truth]


def test_named_plans_and_plan_validation():
    assert NAMED_PLANS["fused-mixed"].at(0)[0] == "bf16x3" and NAMED_PLANS["fused-mixed"].at(3)[0] == "tf32x3"
    assert NAMED_PLANS["fused-tf32x3"].at(5) == ("tf32x3", None)
    with pytest.raises(ValueError, match="power of two"):
        FusedPlan(top=6)
    with pytest.raises(ValueError, match="precision must be one of"):
        FusedPlan("fp16")
    with pytest.raises(ValueError, match="cap must be"):
        FusedPlan(cap=0)


def test_fewer_codes_than_the_candidate_count():
    """Codebooks of 4 codes (fewer than the 8 kept, and than the 8 candidates of the fp32
    level of the bf16/fp16 cascade): every search path stays exact instead of failing."""
    rng = np.random.default_rng(11)
    cb = rng.standard_normal((2, 4, 6)).astype(np.float32)
    cb[:, 1] = cb[:, 0] + 1e-7  # near ties: three codes in a window wider than 2 candidates,
    cb[:, 2] = cb[:, 0] - 1e-7  # so rows go past the first level
    x = (cb[0][rng.integers(0, 4, 30)] + 0.01 * rng.standard_normal((30, 6))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    ref = rvq_encode_reference(x, cb)
    for sd in ("bfloat16", "float16", "fused-bf16x3", "fused-mixed"):
        np.testing.assert_array_equal(q.encode(torch.from_numpy(x), search_dtype=sd, candidates=2).numpy(), ref)


@pytest.mark.slow
@pytest.mark.parametrize("mode,slots", [(0, rvq_triton.TOP), (1, rvq_triton.CAP)])
def test_kernel_compiles_for_hopper_without_a_gpu(mode, slots):
    """The interpreter runs the kernel as numpy and checks no GPU typing or layout rule:
    Triton's ahead-of-time compiler (its bundled ptxas, no device needed) builds both passes
    of the bf16x3 kernel for sm_90 (H100/H200) at the production shapes and tiles."""
    if not rvq_triton.available():
        pytest.skip("triton not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    fn = JITFunction(rvq_triton._fused)  # compiled, not interpreted, whatever TRITON_INTERPRET says
    ptrs = dict.fromkeys(("A_HI", "A_LO", "B_HI", "B_LO"), "*bf16")
    ptrs.update(NORM="*fp32", WIN="*fp32", VALS="*fp32", IDS="*i32", COUNT="*i32", D_OUT="*fp32")
    bm, bn, bk, warps, stages = rvq_triton.DEFAULT_TILES["bf16x3"]
    const = dict(K=16384, C=1152, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=0, MODE=mode, SLOTS=slots, WRITE_D=False)
    sig = {**ptrs, "N": "i32", "stride_a": "i32", "stride_b": "i32", **dict.fromkeys(const, "constexpr")}
    k = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    assert "cubin" in k.asm and k.metadata.shared <= 228 * 1024
