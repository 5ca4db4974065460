"""The float64 side of the exact RVQ search (:mod:`asvr.tokenizer.rvq.quantizer`): the numpy
reference every search equals, the certified candidate window of approximate distances, the
re-rank of a few candidates with the reference's formula, and the full float64 search the
cascade ends in.  Split from ``quantizer.py`` (the low-precision search and its bound) in
issue 21, so each file reads as one side of the argument: files under 400 lines.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def rvq_encode_reference(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Float64 numpy reference: greedy RVQ with squared L2 computed as
    ``sum((r - c)^2)``.  ``x`` [N, C], ``codebooks`` [D, K, C] -> codes [N, D] int64.
    Ties go to the lowest index (np.argmin)."""
    r = np.asarray(x, dtype=np.float64).copy()
    cb = np.asarray(codebooks, dtype=np.float64)
    n = r.shape[0]
    codes = np.empty((n, cb.shape[0]), dtype=np.int64)
    step = max(1, (1 << 24) // max(1, cb.shape[1] * cb.shape[2]))
    for d in range(cb.shape[0]):
        for s in range(0, n, step):
            rs = r[s : s + step]
            dist = ((rs[:, None, :] - cb[d][None, :, :]) ** 2).sum(-1)
            codes[s : s + step, d] = dist.argmin(1)
        r -= cb[d][codes[:, d]]
    return codes


def candidate_window(approx: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of approximate distances ``[N, K]`` whose error is at most ``bound`` ``[N]``:
    the approximate best value and index, and how many codes lie within ``2 * bound`` of
    it.  The exact argmin is always among those (it is at most ``bound`` above its exact
    value, which is at most the approximate best's exact value, at most ``bound`` above
    the approximate best), so a count of 1 certifies the approximate best."""
    best_val, best_idx = approx.min(dim=1)
    window = (best_val.double() + 2 * bound).float()
    window = torch.nextafter(window, torch.full_like(window, math.inf))
    count = (approx <= window[:, None]).sum(dim=1)
    return best_val, best_idx, count


def full_search(rc: torch.Tensor, r64: torch.Tensor, p: dict, shortlist: int = 4, block: int = 4096) -> torch.Tensor:
    """Float64 search over the whole codebook: the expanded form (one float64
    matmul on the centred residual ``rc``) shortlists ``shortlist`` codes, which are
    re-ranked with the reference's formula (:func:`rerank`).  Codes tied with the
    ``shortlist``-th value enter the shortlist lowest index first: ``topk`` picks among equal
    values in no set order, so with more than ``shortlist`` equal codes (duplicated codebook
    rows) it left out the lowest index (issue 24: 12 copies of one code gave code 6)."""
    out = torch.empty(rc.shape[0], dtype=torch.long, device=rc.device)
    k_all = p["b64"].shape[0]
    k = min(shortlist, k_all)
    order = torch.arange(k_all, device=rc.device, dtype=torch.float64)
    for s in range(0, rc.shape[0], block):
        approx = p["n64"][None, :] - 2 * (rc[s : s + block] @ p["b64"].T)
        kth = approx.topk(k, dim=1, largest=False).values[:, -1:]
        # every code below the k-th value, then the lowest indices among those equal to it
        key = torch.where(approx < kth, -1.0, torch.where(approx == kth, order, math.inf))
        sidx, _ = key.topk(k, dim=1, largest=False).indices.sort(dim=1)
        out[s : s + block] = rerank(r64[s : s + block], p["orig"], sidx)
    return out


def rerank(r64: torch.Tensor, book64: torch.Tensor, sidx: torch.Tensor) -> torch.Tensor:
    """The reference's formula over a few candidates ``sidx [N, k]`` (sorted by index):
    sum of squared differences of the *uncentred* float64 vectors, lowest index on
    ties.  The centred expanded form is cheaper but rounds: with a mean that is not a
    short binary fraction (K = 48) it broke exact ties towards the wrong code."""
    diff = r64[:, None, :] - book64[sidx]
    dist = (diff * diff).sum(-1)
    return sidx.gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1)


def fp32_window(best: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``best + 2 * bound`` rounded up to fp32 (the approximate distances' type)."""
    window = (best.double() + 2 * bound).float()
    return torch.nextafter(window, torch.full_like(window, math.inf))


def rerank_listed(r64: torch.Tensor, book64: torch.Tensor, listed: torch.Tensor, elems: int = 1 << 24) -> torch.Tensor:
    """:func:`rerank` over per-row candidate lists ``listed [N, m]`` in any order, -1 for
    an empty slot (each row lists at least one code), in row chunks of at most ``elems``
    float64 differences."""
    empty = listed < 0
    big = torch.iinfo(torch.int64).max
    sid, _ = torch.where(empty, big, listed).sort(dim=1)  # ascending: lowest index first on ties
    valid = sid != big
    safe = torch.where(valid, sid, 0)
    out = torch.empty(listed.shape[0], dtype=torch.long, device=listed.device)
    step = max(1, elems // max(1, listed.shape[1] * book64.shape[1]))
    for s in range(0, listed.shape[0], step):
        diff = r64[s : s + step, None, :] - book64[safe[s : s + step]]
        dist = torch.where(valid[s : s + step], (diff * diff).sum(-1), math.inf)
        out[s : s + step] = safe[s : s + step].gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1)
    return out
