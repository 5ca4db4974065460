"""Codebook training with faiss on synthetic vectors (no encoder)."""

from __future__ import annotations

import numpy as np
import pytest

from asvr.tokenizer.rvq.quantizer import rvq_encode_reference
from asvr.tokenizer.rvq.training import CodebookTrainConfig, TrainingError, relative_errors, train_codebooks


def _vectors(n=3000, c=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, c)) * 3
    return (centres[rng.integers(0, 40, n)] + rng.standard_normal((n, c))).astype(np.float32)


@pytest.mark.parametrize("method,shared", [("kmeans", False), ("rq", False), ("kmeans", True)])
def test_training_reduces_error_with_depth(method, shared):
    x = _vectors()
    res = train_codebooks(
        x, CodebookTrainConfig(depth=3, codebook_size=32, method=method, shared=shared, refine_rounds=2, seed=0)
    )
    assert res.codebooks.shape == ((1 if shared else 3), 32, 24) and res.codebooks.dtype == np.float32
    errs = res.rel_error
    if shared:  # greedy RVQ has no zero code: a shared codebook may not help at every depth
        assert errs[0] < 0.5 and errs[-1] < errs[0]
    else:
        assert errs[0] < 0.5 and all(b < a for a, b in zip(errs, errs[1:]))
    # the reported errors are those of the exact greedy codes
    books = np.repeat(res.codebooks, 3, 0) if shared else res.codebooks
    np.testing.assert_allclose(relative_errors(x, books, rvq_encode_reference(x, books)), errs, rtol=1e-6)
    if method == "kmeans":
        kept = [r["error"] for r in res.rounds if r["kept"]]
        assert all(b < a for a, b in zip(kept, kept[1:]))


def test_refinement_beats_plain_residual_kmeans():
    x = _vectors(seed=1)
    plain = train_codebooks(x, CodebookTrainConfig(depth=3, codebook_size=32, refine_rounds=0))
    refined = train_codebooks(x, CodebookTrainConfig(depth=3, codebook_size=32, refine_rounds=2))
    assert refined.rel_error[-1] <= plain.rel_error[-1]


def test_bad_configs():
    with pytest.raises(TrainingError, match="codebook size 64 > 50"):
        train_codebooks(_vectors(n=50), CodebookTrainConfig(depth=2, codebook_size=64))
    with pytest.raises(ValueError, match="power-of-two"):
        CodebookTrainConfig(depth=2, codebook_size=48, method="rq")
    with pytest.raises(ValueError, match="--method kmeans"):
        CodebookTrainConfig(depth=2, codebook_size=64, method="rq", shared=True)
