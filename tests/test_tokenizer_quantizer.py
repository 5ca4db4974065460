"""Exactness of the RVQ encoder against the float64 numpy reference, for every
search precision available on CPU, incl. shared codebooks, near-ties that force
the float64 fallback, overflow of fp16, and real EfficientNet features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference

DTYPES = ["float32", "bfloat16", "float16"]


def _data(seed, n=300, d=3, k=64, c=48, scale=1.0):
    rng = np.random.default_rng(seed)
    cb = rng.standard_normal((d, k, c)).astype(np.float32) * (0.5 ** np.arange(d))[:, None, None].astype(np.float32)
    x = (cb[0][rng.integers(0, k, n)] + 0.3 * rng.standard_normal((n, c))).astype(np.float32)
    return x * scale, cb * scale


@pytest.mark.parametrize("search_dtype", DTYPES)
@pytest.mark.parametrize("cand", [1, 4, 16])
def test_random_data_exact(search_dtype, cand):
    x, cb = _data(0)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=cand, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert stats.rows == x.shape[0] * cb.shape[0]


@pytest.mark.parametrize("search_dtype", DTYPES)
def test_shared_codebook_exact(search_dtype):
    x, cb = _data(1, d=1, k=128)
    q = ResidualQuantizer(torch.from_numpy(cb), depth=4)
    assert q.shared
    codes = q.encode(torch.from_numpy(x), search_dtype=search_dtype)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, np.repeat(cb, 4, axis=0)))


@pytest.mark.parametrize("search_dtype", DTYPES)
def test_near_ties_force_fallback_and_stay_exact(search_dtype):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((16, 40)).astype(np.float32)
    # each code has 5 twins 1e-7 away (more than `candidates`): no precision can certify a
    # short list, so rows go down the cascade; code 96 duplicates code 0 exactly
    twins = [base + 1e-7 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(5)]
    cb = np.concatenate([base, *twins, base[:1]])[None]
    cb = np.concatenate([cb, 0.3 * cb], axis=0)
    x = (base[rng.integers(0, 16, 200)] + 0.05 * rng.standard_normal((200, 40))).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes, stats = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=4, return_stats=True)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))
    assert stats.fallback_rows > 0
    assert not (codes[:, 0] == 96).any()  # ties go to the lowest index


@pytest.mark.parametrize("search_dtype", DTYPES)
def test_large_magnitudes_exact(search_dtype):
    """Dot products beyond fp16's range (65504) must not certify wrong candidates."""
    x, cb = _data(3, c=64, scale=300.0)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=4)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))


@pytest.mark.parametrize("search_dtype", ["bfloat16", "float16"])
def test_tiny_magnitudes_exact(search_dtype):
    """Residuals in fp16's subnormal range lose relative precision."""
    x, cb = _data(4, c=32, scale=1e-5)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes = q.encode(torch.from_numpy(x), search_dtype=search_dtype, candidates=4)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(x, cb))


@pytest.mark.parametrize("search_dtype", DTYPES)
def test_real_efficientnet_features_exact(tiny_tokenizer, search_dtype):
    from conftest import make_image

    feats = tiny_tokenizer.features(tiny_tokenizer.preprocess_images([make_image(i) for i in range(4)]))
    x = feats.reshape(-1, feats.shape[-1])
    # codebooks drawn from the features themselves: realistic near neighbours
    rng = np.random.default_rng(0)
    xs = x.numpy()
    cb = np.stack([xs[rng.choice(len(xs), 64, replace=False)] * s for s in (1.0, 0.3, 0.1)]).astype(np.float32)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes = q.encode(x, search_dtype=search_dtype, candidates=8)
    np.testing.assert_array_equal(codes.numpy(), rvq_encode_reference(xs, cb))
    # and the tokenizer's own codebooks through the public path
    got = tiny_tokenizer.quantizer.encode(x, search_dtype=search_dtype)
    np.testing.assert_array_equal(got.numpy(), rvq_encode_reference(xs, tiny_tokenizer.quantizer.codebooks.numpy()))


def test_decode_and_cumulative_match_numpy():
    x, cb = _data(5, d=3)
    q = ResidualQuantizer(torch.from_numpy(cb))
    codes = q.encode(torch.from_numpy(x)).reshape(10, 30, 3)
    c = codes.numpy()
    want_cum = np.cumsum(np.stack([cb[d][c[..., d]] for d in range(3)], axis=-2), axis=-2)
    np.testing.assert_allclose(q.cumulative(codes).numpy(), want_cum, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q.decode(codes).numpy(), want_cum[..., -1, :], rtol=1e-6, atol=1e-6)
    # shared codebook decode
    qs = ResidualQuantizer(torch.from_numpy(cb[:1]), depth=3)
    np.testing.assert_allclose(qs.decode(codes).numpy(), cb[0][c].sum(-2), rtol=1e-6, atol=1e-6)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="cannot serve depth"):
        ResidualQuantizer(torch.zeros(2, 4, 8), depth=3)
    q = ResidualQuantizer(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="dim"):
        q.encode(torch.zeros(3, 9))
