"""The error bound the candidate search relies on, checked against the observed
error on data built to reach it, and exact ties that only the tie-break rules
resolve.  The plain exactness tests (test_tokenizer_quantizer.py) pass with a
bound a few times too small: random data never gets near the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference
from asvr.tokenizer.rvq.quantizer import candidate_window

U = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
DTYPES = ["float32", "bfloat16", "float16"]


def _exact(q: ResidualQuantizer, r: torch.Tensor, depth: int = 0) -> torch.Tensor:
    """Float64 ``||c - m||^2 - 2 (r - m).(c - m)``: what approximate_distances approximates."""
    cb = q.codebook(depth).double()
    m = cb.mean(0)
    b = cb - m
    return (b * b).sum(1)[None] - 2 * (r.double() - m) @ b.T


def _relative_error(q, r, dtype, depth=0):
    """Observed max error per row, in units of ``u * ||r - m|| * max||c - m||`` (the dot
    product's relative error), and the bound in the same units."""
    approx, bound = q.approximate_distances(r, depth, dtype)
    err = (approx.double() - _exact(q, r, depth)).abs().max(1).values
    cb = q.codebook(depth).double()
    cb = cb - cb.mean(0)
    scale = 2 * U[dtype] * (r.double() - q.codebook(depth).double().mean(0)).norm(dim=1) * cb.norm(dim=1).max()
    return err, bound, err / scale


def _worst_2d_pairs(dtype: str, n: int = 200_000, keep: int = 16, seed: int = 0):
    """2-d unit vectors (code, residual) whose low-precision dot product is furthest from
    the exact one: both operands round the same way and the rounded product lands just
    past a rounding midpoint of the output, so the error exceeds 2u (operands) and
    approaches 3u (operands + output rounding)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 1.37, n)
    b = a + rng.uniform(-0.08, 0.08, n)
    w = np.stack([np.cos(a), np.sin(a)], 1)
    v = np.stack([np.cos(b), np.sin(b)], 1)
    low = torch.float16 if dtype == "float16" else torch.bfloat16
    rd = lambda z: torch.from_numpy(np.ascontiguousarray(z)).to(low).double().numpy()  # noqa: E731
    dot = rd((rd(w) * rd(v)).sum(1).astype(np.float32).astype(np.float64))
    worst = np.argsort(-np.abs(dot - (w * v).sum(1)))[:keep]
    return w[worst], v[worst]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bound_covers_worst_case_low_precision_rounding(dtype):
    """fp16/bf16: operands *and* output are rounded, so the bound needs 3u, not 2u."""
    w, v = _worst_2d_pairs(dtype)
    worst = 0.0
    for wi, vi in zip(w, v):
        q = ResidualQuantizer(torch.from_numpy(np.stack([wi, -wi]))[None].float())  # mean 0: no centring
        r = torch.from_numpy(vi[None] * 3.0)
        err, bound, rel = _relative_error(q, r, dtype)
        assert (err <= bound).all(), (dtype, float(rel.max()))
        worst = max(worst, float(rel.max()))
    assert worst > 2.05, worst  # the data really reaches past a 2u bound


def test_bound_covers_fp32_accumulation():
    """fp32, 256-d, all terms of the dot product positive: the accumulation error
    (several u) dominates the operand rounding (2u)."""
    rng = np.random.default_rng(0)
    c = 256
    base = rng.uniform(0.5, 1.0, c)
    cb = (base + 0.01 * rng.standard_normal((64, c))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(np.concatenate([cb, -cb])[None]))
    r = torch.from_numpy(base * 7 + 0.01 * rng.standard_normal((256, c)))
    err, bound, rel = _relative_error(q, r, "float32")
    assert (err <= bound).all()
    # without the accumulation term the bound is ~4.2 in these units (2u operands + the
    # rounding of ||c||^2 and of the result): the data must get past it
    assert float(rel.max()) > 5, float(rel.max())


@st.composite
def _offset_near_ties(draw):
    """Depth >= 2 codebooks whose deeper levels sit on a large common offset the residual
    does not carry, codes in near-tied clusters, features near a code of each depth."""
    seed = draw(st.integers(0, 2**31 - 1))
    depth = draw(st.integers(2, 3))
    k = draw(st.sampled_from([16, 24, 48]))
    c = draw(st.sampled_from([8, 33, 64]))
    offset = draw(st.sampled_from([10.0, 300.0, 3e4]))
    spread = draw(st.sampled_from([1e-3, 1e-5]))
    rng = np.random.default_rng(seed)
    books = [rng.standard_normal((k, c))]
    for _ in range(1, depth):
        centres = rng.standard_normal((max(1, k // 4), c))
        near = centres[rng.integers(0, len(centres), k)] + spread * rng.standard_normal((k, c))
        books.append(offset + 0.1 * near)
    cb = np.stack(books).astype(np.float32)
    n = 64
    x = cb[0][rng.integers(0, k, n)].astype(np.float64)
    for d in range(1, depth):
        x += cb[d][rng.integers(0, k, n)] * rng.choice([0.0, 1.0], n)[:, None]  # some rows far from the offset
    x += 0.05 * spread * rng.standard_normal(x.shape)
    return x.astype(np.float32), cb


@settings(max_examples=30, deadline=None, derandomize=True)
@given(_offset_near_ties(), st.sampled_from(DTYPES), st.sampled_from([2, 4, 8]))
def test_bound_and_codes_on_offset_near_ties(data, dtype, cand):
    x, cb = data
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes = q.encode(torch.from_numpy(x), search_dtype=dtype, candidates=cand)
    ref = rvq_encode_reference(x, cb)
    np.testing.assert_array_equal(codes.numpy(), ref)
    # the residual each depth sees (the reference's codes), against that depth's bound
    r = torch.from_numpy(x.astype(np.float64))
    for d in range(cb.shape[0]):
        err, bound, _ = _relative_error(q, r, dtype, d)
        assert (err <= bound).all()
        r = r - torch.from_numpy(cb[d].astype(np.float64))[torch.from_numpy(ref[:, d])]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.integers(2, 12), st.floats(1e-6, 1e3))
def test_window_keeps_the_exact_argmin_whatever_the_errors(seed, k, b):
    """Any errors within the bound, incl. the worst (the approximate best underestimated
    by the bound, the exact best overestimated by it): the exact argmin stays in the
    window, so a count of 1 never certifies a wrong code."""
    rng = np.random.default_rng(seed)
    approx = (rng.uniform(0, 3 * b, (64, k))).astype(np.float32)
    err = rng.choice([-b, b, 0.0], (64, k)) * rng.choice([1.0, rng.uniform()], (64, k))
    err[:, 0] = b  # code 0 overestimated by the full bound: its exact distance is approx - b
    exact = approx.astype(np.float64) - err
    truth = exact.argmin(1)
    best_val, best_idx, count = candidate_window(torch.from_numpy(approx), torch.full((64,), b, dtype=torch.float64))
    rank = (approx <= approx[np.arange(64), truth][:, None]).sum(1)  # codes at or below the truth's approx
    assert (count.numpy() >= rank).all()
    certified = count.numpy() == 1
    assert (best_idx.numpy()[certified] == truth[certified]).all()


def _swap_ties(seed: int, k: int, c: int = 16, n: int = 256):
    """Exact ties at depth 1: codes come in pairs (a, a with coordinates 0 and 1 swapped)
    and every residual has equal coordinates 0 and 1, so the two distances are equal in
    float64 (all values are short binary fractions), while the low-precision search sees
    them in either order (magnitudes spread over 2^-16..2^4).  k = 48: the codebook mean
    is not a short binary fraction, so a re-rank on centred vectors rounds."""
    rng = np.random.default_rng(seed)
    dy = lambda shape, bits: np.round(rng.uniform(-1, 1, shape) * 2**bits) / 2**bits  # noqa: E731
    scale = 2.0 ** rng.integers(-6, 5, c)
    a = dy((k // 2, c), 10) * scale
    b = a.copy()
    b[:, [0, 1]] = a[:, [1, 0]]
    cb1 = np.empty((k, c))
    cb1[0::2], cb1[1::2] = a, b
    cb0 = dy((k, c), 4) * 64
    t = dy((n, c), 10) * scale
    t[:, 1] = t[:, 0]
    x = cb0[rng.integers(0, k, n)] + t
    cb = np.stack([cb0, cb1]).astype(np.float32)
    assert (cb.astype(np.float64) == np.stack([cb0, cb1])).all() and (x.astype(np.float32) == x).all()
    return x.astype(np.float32), cb


@pytest.mark.parametrize("k", [32, 48])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_go_to_the_lowest_index(k, dtype):
    """Through every path: the short re-rank (2..8 candidates), and the full search
    (candidates >= K)."""
    tied = 0
    for seed in range(3):
        x, cb = _swap_ties(seed, k)
        ref = rvq_encode_reference(x, cb)
        tied += int((ref[:, 1] % 2 == 0).sum())
        q = ResidualQuantizer(torch.from_numpy(cb))
        for cand in (2, 8, k):
            codes = q.encode(torch.from_numpy(x), search_dtype=dtype, candidates=cand)
            np.testing.assert_array_equal(codes.numpy(), ref, err_msg=f"seed {seed} candidates {cand}")
    assert tied > 100  # most rows pick a tied pair's lower code


def test_defaults_shared_books_and_flat_codes():
    """``approximate_distances`` with its default dtype and on a shared codebook at any
    depth; ``cumulative`` on flat ``[N, D]`` codes."""
    rng = np.random.default_rng(7)
    cb = rng.standard_normal((1, 16, 8)).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb), depth=3)
    r = torch.from_numpy(rng.standard_normal((5, 8)))
    a0, b0 = q.approximate_distances(r)
    for d in (1, 2):
        a, b = q.approximate_distances(r, d, "float32")
        assert torch.equal(a, a0) and torch.equal(b, b0)
    np.testing.assert_allclose(a0.numpy(), _exact(q, r).numpy(), rtol=1e-5, atol=1e-5)
    codes = torch.from_numpy(rng.integers(0, 16, (5, 3)))
    want = np.cumsum(cb[0][codes.numpy()], axis=1)
    assert q.cumulative(codes).shape == (5, 3, 8)
    np.testing.assert_allclose(q.cumulative(codes).numpy(), want, rtol=1e-6, atol=1e-6)


def test_full_search_over_more_rows_than_one_block():
    """``candidates >= K`` sends every row to the full float64 search, 4096 rows a block."""
    rng = np.random.default_rng(8)
    cb = rng.standard_normal((2, 16, 3)).astype(np.float32)
    x = rng.standard_normal((4100, 3)).astype(np.float32)
    codes = ResidualQuantizer(torch.from_numpy(cb)).encode(torch.from_numpy(x), candidates=16)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))


def test_search_stats_and_expanded_codebooks():
    """Well-separated codes, features right on them: every row is certified by the first
    search (no fallback, no full search); ``expanded_codebooks`` repeats a shared book."""
    rng = np.random.default_rng(9)
    cb = (10 * rng.standard_normal((2, 16, 8))).astype(np.float32)
    idx = rng.integers(0, 16, (50, 2))
    x = (cb[0][idx[:, 0]] + cb[1][idx[:, 1]] * 0.01).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert (stats.rows, stats.fallback_rows, stats.full_rows, stats.fallback_fraction) == (100, 0, 0, 0.0)
    shared = ResidualQuantizer(torch.from_numpy(cb[:1]), depth=3)
    assert torch.equal(shared.expanded_codebooks(), torch.from_numpy(cb[:1]).expand(3, -1, -1))
    assert torch.equal(q.expanded_codebooks(), torch.from_numpy(cb))


def test_search_stats_add_up_over_depths():
    """Both depths hold near-twin codes (2^-18 apart: no fp32 search can certify one),
    all values short binary fractions so the depth-1 residual is exact in float32: the
    two-depth stats are the sums of the one-depth stats."""
    rng = np.random.default_rng(10)
    dy = lambda shape, bits: np.round(rng.uniform(-1, 1, shape) * 2**bits) / 2**bits  # noqa: E731
    books = []
    for scale in (4.0, 1.0):
        base = dy((8, 6), 6) * scale
        books.append(np.concatenate([base, base + 2.0**-18 * rng.choice([-1, 1], base.shape)]))
    cb = np.stack(books).astype(np.float32)
    x = cb[0][rng.integers(0, 16, 200)] + cb[1][rng.integers(0, 16, 200)] + dy((200, 6), 12) * 2**-6
    x = x.astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, both = q.encode(torch.from_numpy(x), candidates=1, return_stats=True)
    _, first = ResidualQuantizer(torch.from_numpy(cb[:1])).encode(torch.from_numpy(x), candidates=1, return_stats=True)
    r1 = x - cb[0][codes[:, 0].numpy()]
    _, second = ResidualQuantizer(torch.from_numpy(cb[1:])).encode(
        torch.from_numpy(r1), candidates=1, return_stats=True
    )
    assert first.fallback_rows > 0 and second.fallback_rows > 0 and first.full_rows > 0 and second.full_rows > 0
    assert both.fallback_rows == first.fallback_rows + second.fallback_rows
    assert both.full_rows == first.full_rows + second.full_rows


def test_tf32_on_cpu_and_low_precision_bound_for_small_residuals():
    """``tf32`` is an fp32 search on CPU; residuals far below 1 must still be scaled to
    unit norm before the fp16/bf16 cast (fp16 subnormals lose relative precision)."""
    x, cb = _swap_ties(0, 32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    np.testing.assert_array_equal(
        q.encode(torch.from_numpy(x), search_dtype="tf32", candidates=4).numpy(), rvq_encode_reference(x, cb)
    )
    for dtype in ("float16", "bfloat16"):
        w, v = _worst_2d_pairs(dtype, n=2000, keep=4)
        for wi, vi in zip(w, v):
            q = ResidualQuantizer(torch.from_numpy(np.stack([wi, -wi]))[None].float())
            err, bound, _ = _relative_error(q, torch.from_numpy(vi[None] * 1e-6), dtype)
            assert (err <= bound).all(), dtype


def test_constructor_messages_and_no_state_dict_entry():
    with pytest.raises(ValueError, match=r"codebooks must be \[D, K, C\], got shape \(4, 8\)"):
        ResidualQuantizer(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="^2 codebooks cannot serve depth 3$"):
        ResidualQuantizer(torch.zeros(2, 4, 8), depth=3)
    assert "codebooks" not in ResidualQuantizer(torch.zeros(2, 4, 8)).state_dict()  # frozen, saved by the artifact
