"""Exact RVQ codes where a plausible one-line bug shows (issue 24), each against the float64
numpy reference or codes worked out by hand:

* the lowest-index rule on exact ties for *every* search type (``SEARCH_DTYPES``: the
  plain fp32/tf32/fp16/bf16 searches and the fused ``fused-*`` ones, through the short
  re-rank, the cascade and the full search);
* codebooks with fewer than 8 codes and ``candidates`` below the codebook size (the low
  precision levels fell back with 8 candidates: ``selected index k out of range``);
* one vector through several depths, built so that float32 residuals (or float32
  distances) change a code at every depth after the first: the float64 residual is what
  the codes follow.

The fused types run Triton's kernel in its CPU interpreter when triton is installed, else
the kernel's torch stand-in (the same four-nearest output, certification and re-rank)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # the interpreter must be chosen before triton is imported (its language module reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_quantizer_bound import _swap_ties  # noqa: E402

from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference  # noqa: E402
from asvr.tokenizer.rvq.quantizer import SEARCH_DTYPES  # noqa: E402


def test_every_search_type_is_covered():
    assert set(SEARCH_DTYPES) == {
        "float32",
        "tf32",
        "float16",
        "bfloat16",
        "fused-bf16x3",
        "fused-tf32x3",
        "fused-fp32",
        "fused-tf32",
        "fused-mixed",  # issue 27: bf16x3 at depth 0, tf32x3 deeper
    }


# --------------------------------------------------------------------------- exact ties, every search type
@pytest.mark.parametrize("k", [32, 48])
@pytest.mark.parametrize("search_dtype", SEARCH_DTYPES)
def test_exact_ties_go_to_the_lowest_index_for_every_search_type(search_dtype, k):
    """Swap-tied pairs (codes a and a with two coordinates swapped, residuals equal there):
    float64 distances tie exactly, every approximate search sees them in either order."""
    tied = 0
    for seed in range(2):
        x, cb = _swap_ties(seed, k, n=128)
        ref = rvq_encode_reference(x, cb)
        tied += int((ref[:, 1] % 2 == 0).sum())
        q = ResidualQuantizer(torch.from_numpy(cb))
        for cand in (2, 8, k):
            codes = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=cand)
            np.testing.assert_array_equal(codes.numpy(), ref, err_msg=f"seed {seed} candidates {cand}")
    assert tied > 50  # most rows pick a tied pair's lower code


@pytest.mark.parametrize("search_dtype", SEARCH_DTYPES)
def test_all_codes_tied_go_to_code_zero(search_dtype):
    """K copies of one code: every distance equal, at every depth; code 0 every time."""
    rng = np.random.default_rng(1)
    cb = np.repeat(rng.standard_normal((3, 1, 8)).astype(np.float32), 12, axis=1)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    for cand in (1, 3, 12):
        codes = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=cand)
        assert (codes.numpy() == 0).all(), cand


# --------------------------------------------------------------------------- fewer than 8 codes
@pytest.mark.parametrize("search_dtype", SEARCH_DTYPES)
def test_codebooks_smaller_than_the_fallback_candidate_count(search_dtype):
    """K = 2..7 codes on a sphere around the vectors (all K nearly tied, 1e-5 apart: beyond
    what fp16/bf16 can certify) with every ``candidates`` below K: the rows go down the
    cascade, whose fp32 level asked for 8 candidates (crash: selected index k out of range)."""
    rng = np.random.default_rng(2)
    for k in (2, 3, 5, 7):
        centre = rng.standard_normal(16)
        u = rng.standard_normal((k, 16))
        sphere = centre + u / np.linalg.norm(u, axis=1, keepdims=True)
        cb = np.stack([sphere, rng.standard_normal((k, 16))]).astype(np.float32)
        x = (centre + 1e-5 * rng.standard_normal((30, 16))).astype(np.float32)
        ref = rvq_encode_reference(x, cb)
        q = ResidualQuantizer(torch.from_numpy(cb))
        for cand in range(1, k + 1):
            codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=cand, return_stats=True)
            np.testing.assert_array_equal(codes.numpy(), ref, err_msg=f"K={k} candidates={cand}")
            if cand < k and search_dtype in ("float16", "bfloat16"):
                assert stats.fallback_per_depth[0] == 30  # every row reaches the fallback level


# --------------------------------------------------------------------------- float64 residuals, one vector
E = 2.0**-23


def _deep_case():
    """One vector ``x = 1`` and four depths of float32 codebooks (C = 1, K = 4, the last two
    codes far away) where the float64 residual picks code 1 at depths 1..3 and a float32
    residual (or float32 distances) picks code 0:

    depth 0: ``-2^-30`` -> r = 1 + 2^-30 (float32: 1);  depth 1: ``1 -+ 2^-23``: r is nearer
    ``1 + 2^-23`` (float32: an exact tie, code 0);  depth 2: ``+- 2^-23`` for r = 2^-30 - 2^-23;
    depth 3: ``0, 2^-30`` for r = 2^-30."""
    far = [40.0, -40.0]
    cb = np.array(
        [
            [-(2.0**-30), 3.0, *far],
            [1 - E, 1 + E, *far],
            [E, -E, *far],
            [0.0, 2.0**-30, *far],
        ],
        dtype=np.float32,
    )[:, :, None]
    assert (cb.astype(np.float64)[:, :2, 0] == [[-(2.0**-30), 3], [1 - E, 1 + E], [E, -E], [0, 2.0**-30]]).all()
    return np.ones((1, 1), np.float32), cb


def _float32_loop(x, cb):
    """The reference's loop in float32 throughout: what a lost float64 cast computes."""
    r = x.astype(np.float32).copy()
    codes = []
    for d in range(cb.shape[0]):
        k = int(((r[:, None, :] - cb[d][None]) ** 2).sum(-1).argmin(1)[0])
        codes.append(k)
        r = (r - cb[d][k]).astype(np.float32)
    return codes


def test_the_deep_case_has_teeth():
    """The reference follows the float64 residual (codes by hand); float32 arithmetic does not."""
    x, cb = _deep_case()
    assert rvq_encode_reference(x, cb).tolist() == [[0, 1, 1, 1]]
    assert _float32_loop(x, cb) == [0, 0, 0, 0]
    # float32 residuals alone (float64 distances) already change the code at depth 1
    r32 = np.float32(x[0, 0]) - cb[0, 0, 0]
    assert r32 == 1.0 and (np.float64(x[0, 0]) - np.float64(cb[0, 0, 0])) == 1 + 2.0**-30


@pytest.mark.parametrize("search_dtype", SEARCH_DTYPES)
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_one_vector_through_several_depths_follows_the_float64_residual(search_dtype, depth):
    x, cb = _deep_case()
    want = [[0, 1, 1, 1][:depth]]
    q = ResidualQuantizer(torch.from_numpy(np.ascontiguousarray(cb[:depth])))
    for cand in (1, 2, 4):
        codes = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=cand)
        assert codes.tolist() == want, cand
    # a batch of copies and 2-d lead dimensions give the same codes row by row
    codes = q.encode(torch.from_numpy(np.ones((3, 2, 1), np.float32)), search_dtype=search_dtype)
    assert codes.reshape(-1, depth).tolist() == want * 6
