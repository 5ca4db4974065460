"""Greedy residual quantization (RVQ), exact to a float64 reference.

Encoding is the reference's: ``r = x; for d: k_d = argmin_k ||r - c_{d,k}||^2;
r -= c_{d,k_d}``.  The distances are what costs (N x K x C per depth), so the
fast path computes approximate distances in low precision (fp32 blocked
matmul on CPU; tf32, fp16 or bf16 tensor cores on GPU) from a float64
residual.  With ``bound`` an upper bound on the error of one approximate
distance, every code within ``2 * bound`` of the approximate best is a
*candidate*, and no other code can be nearer.  A single candidate is the exact
answer; a few (``<= candidates``) are re-ranked in float64 (expanded form
``||c||^2 - 2 r.c``, whose rounding only matters for ties at 1e-15); more
send the row down a cascade: fp32, then a full float64 search.  So the codes
equal :func:`rvq_encode_reference`, whatever the search precision; precision
only moves the share of rows that go down the cascade (bench/).  An argmin
and a count are two cheap passes over the distance matrix, cheaper than the
top-k of an earlier version.  ``search_dtype="fused-*"`` replaces the first
level by a Triton kernel (asvr.tokenizer.rvq.fused_triton) that never writes the
matrix: it returns the eight nearest per row, certified with the same bound,
and a second fused pass lists the window of the rows it did not settle
(re-ranked in float64; a full float64 search only past ``cap`` codes); the
default on CUDA (bench/results/gpu_issues_12_13_h200.md).  ``search_dtype``
also takes a :class:`~asvr.tokenizer.rvq.plan.FusedPlan` (precision per depth,
kept count, tiles).

The bound per row is ``2 * delta * ||r|| * max_k ||c_k||`` plus the rounding of
``||c_k||^2``, with ``delta`` the relative error of one dot product: the
rounding of the operands to the search dtype, ``2u`` (``3u`` for fp16/bf16,
whose matmul output is rounded too; a worst-case bound, for any data), plus the fp32 accumulation, modelled as a random walk
(``4 sqrt(C) 2^-24``, four standard deviations) because the worst case
``C 2^-24`` made 75% of the rows of a 1152-d codebook fall back on an H200
(bench/gpu_tokenizer.py).  Distances are computed around each codebook's mean
(they are translation invariant), so the bound scales with the codes' spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from asvr.tokenizer.rvq.exact import (  # noqa: F401 - rvq_encode_reference: importable from here
    candidate_window,
    fp32_window,
    full_search,
    rerank,
    rerank_listed,
    rvq_encode_reference,
)
from asvr.tokenizer.rvq.plan import NAMED_PLANS, FusedPlan

# unit roundoff of the operands for each search precision
_UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    "tf32": 2.0**-11,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
_SEARCH_DTYPES = {"float32": torch.float32, "tf32": "tf32", "float16": torch.float16, "bfloat16": torch.bfloat16}
# fused Triton search (asvr.tokenizer.rvq.fused_triton): nearest few per row in one pass, no [N, K] matrix
_SEARCH_DTYPES.update(NAMED_PLANS)
SEARCH_DTYPES = tuple(_SEARCH_DTYPES)
"""Every ``search_dtype`` :meth:`ResidualQuantizer.encode` takes (codes are the same for all)."""


def default_search_dtype(device: torch.device) -> str:
    """The fastest exact search measured for ``device``: the fused Triton kernel in bf16x3 on
    CUDA when triton is installed (one H200, 8 x 16384 x 1152, batch of 64 images: 245 img/s
    vs 152 for the fp32 cascade on random-SigLIP features, 298 vs 159 on features with an
    EfficientNet-Lite0 spread; bench/results/gpu_rvq_kernel_h200.json), else fp32."""
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "fused-bf16x3"
    return "float32"


@dataclass(frozen=True)
class SearchStats:
    rows: int
    fallback_rows: int
    """(row, depth) searches whose first-level candidates were not certified."""
    full_rows: int = 0
    """(row, depth) searches that needed the full float64 search."""
    fallback_per_depth: tuple[int, ...] = ()
    """``fallback_rows`` split by depth (rows per depth = ``rows / depth``)."""
    collected_per_depth: tuple[int, ...] = ()
    """Fused search: rows per depth the collect pass settled (of ``fallback_per_depth``)."""

    @property
    def fallback_fraction(self) -> float:
        return self.fallback_rows / max(1, self.rows)


class ResidualQuantizer(torch.nn.Module):
    """Frozen RVQ codebooks ``[D or 1, K, C]`` with exact greedy encoding.

    ``depth`` may exceed the number of stored codebooks only when the codebook is
    shared (one codebook used at every depth, as DualToken's ``shared_codebook``).
    """

    # A registered buffer, typed here: torch's Module.__getattr__ types it Tensor | Module.
    codebooks: torch.Tensor
    _cache: list[dict] | None
    _cache_key: str | None

    def __init__(self, codebooks: torch.Tensor, depth: int | None = None):
        super().__init__()
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be [D, K, C], got shape {tuple(codebooks.shape)}")
        depth = codebooks.shape[0] if depth is None else depth
        if codebooks.shape[0] not in (1, depth):
            raise ValueError(f"{codebooks.shape[0]} codebooks cannot serve depth {depth}")
        self.depth = depth
        self.register_buffer("codebooks", codebooks.detach().float().contiguous(), persistent=False)
        self._cache, self._cache_key = None, None  # prepared codebooks per (device, dtype)

    @property
    def shared(self) -> bool:
        return self.codebooks.shape[0] == 1 and self.depth > 1

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[2]

    def codebook(self, d: int) -> torch.Tensor:
        return self.codebooks[0 if self.codebooks.shape[0] == 1 else d]

    def expanded_codebooks(self) -> torch.Tensor:
        """``[D, K, C]`` even when shared."""
        return self.codebooks.expand(self.depth, -1, -1) if self.codebooks.shape[0] == 1 else self.codebooks

    # ------------------------------------------------------------------ decode
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[..., D]`` -> sum of code vectors ``[..., C]`` (float32)."""
        return self.cumulative(codes)[..., -1, :]

    def cumulative(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[..., D]`` -> reconstruction after each depth ``[..., D, C]``."""
        codes = codes.long()
        parts = torch.stack([self.codebook(d)[codes[..., d]] for d in range(codes.shape[-1])], dim=-2)
        return parts.cumsum(dim=-2)

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(
        self,
        x: torch.Tensor,
        *,
        search_dtype: str | FusedPlan = "float32",
        candidates: int = 8,
        block_rows: int = 8192,
        return_stats: bool = False,
    ):
        """``x [..., C]`` -> codes ``[..., D]`` (int64), equal to the float64 reference.

        ``search_dtype`` picks the precision of the candidate search (a name of
        :data:`SEARCH_DTYPES` or a :class:`~asvr.tokenizer.rvq.plan.FusedPlan`); the result
        does not depend on it (see module docstring)."""
        sdtype: object
        if isinstance(search_dtype, FusedPlan):
            sdtype = search_dtype
        elif search_dtype in _SEARCH_DTYPES:
            sdtype = _SEARCH_DTYPES[search_dtype]
        else:
            raise ValueError(f"search_dtype must be one of {sorted(_SEARCH_DTYPES)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"features have dim {x.shape[-1]}, codebooks {self.dim}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        out = torch.empty((flat.shape[0], self.depth), dtype=torch.long, device=x.device)
        full = 0
        per_depth = [0] * self.depth
        collected = [0] * self.depth
        for s in range(0, flat.shape[0], block_rows):
            codes, fb, co, fu = self._encode_block(flat[s : s + block_rows], sdtype, candidates)
            out[s : s + block_rows] = codes
            per_depth = [a + b for a, b in zip(per_depth, fb)]
            collected = [a + b for a, b in zip(collected, co)]
            full += fu
        out = out.reshape(*lead, self.depth)
        if return_stats:
            return out, SearchStats(
                rows=flat.shape[0] * self.depth,
                fallback_rows=sum(per_depth),
                full_rows=full,
                fallback_per_depth=tuple(per_depth),
                collected_per_depth=tuple(collected),
            )
        return out

    def _prepared(self, device: torch.device) -> list[dict]:
        """Per depth: float64 book, ||c||^2 (float64, float32), max ||c||, and the book
        in each search dtype (scaled by 1/max||c|| for fp16/bf16, so no overflow),
        cached per device: the codebooks are frozen."""
        if self._cache is None or self._cache_key != str(device):  # key and cache are set together
            cb64 = self.codebooks.to(device=device, dtype=torch.float64)
            prepared: list[dict] = []
            for i in range(cb64.shape[0]):
                # Distances are translation invariant: search around the codebook mean, so the
                # error bound scales with the codes' spread, not with a shared offset
                # (features often carry a large common component).
                mean = cb64[i].mean(0)
                b64 = cb64[i] - mean
                n2 = (b64 * b64).sum(1)
                prepared.append(
                    {
                        "orig": cb64[i],
                        "mean": mean,
                        "b64": b64,
                        "n64": n2,
                        "n32": n2.float(),
                        "cmax": float(n2.max().sqrt()),
                        "lp": {},
                    }
                )
            self._cache, self._cache_key = prepared, str(device)
        return self._cache

    @staticmethod
    def _book_in(p: dict, sdtype):
        """The centred book in ``sdtype`` (a torch dtype, "tf32", or ("fused", precision))."""
        if sdtype not in p["lp"]:
            if isinstance(sdtype, tuple):
                from asvr.tokenizer.rvq import fused_triton

                p["lp"][sdtype] = fused_triton.split_operand(p["b64"].float(), sdtype[1])
            elif sdtype in (torch.float32, "tf32"):
                p["lp"][sdtype] = p["b64"].float().contiguous()
            else:
                p["lp"][sdtype] = (p["b64"] / max(p["cmax"], 1e-30)).to(sdtype).contiguous()
        return p["lp"][sdtype]

    def approximate_distances(
        self, residual: torch.Tensor, depth: int = 0, search_dtype: str = "float32"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the candidate search sees at ``depth``, for tests and benches: the
        approximate distances ``||c_k - m||^2 - 2 (r - m).(c_k - m)`` ``[N, K]`` (fp32; ``m``
        the codebook's mean, so the exact value is ``||r - c_k||^2 - ||r - m||^2``) and
        the bound ``[N]`` on their error that the search relies on."""
        p = self._prepared(residual.device)[0 if self.codebooks.shape[0] == 1 else depth]
        rc = residual.to(torch.float64) - p["mean"]
        sdtype = _SEARCH_DTYPES[search_dtype]
        if isinstance(sdtype, FusedPlan):
            raise ValueError("approximate_distances: the fused search has no [N, K] matrix (fused_triton.nearest)")
        return self._approx(rc, p, sdtype)

    def _approx(self, r: torch.Tensor, p: dict, sdtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate distances ``||c||^2 - 2 r.c`` in the search dtype (``r`` centred,
        float64) and the per-row bound on their error."""
        n, c = r.shape
        book = self._book_in(p, sdtype)
        rnorm = r.norm(dim=1)
        if sdtype in (torch.float32, "tf32"):
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = sdtype == "tf32"
            try:
                dots = r.float() @ book.T
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            # unit-norm rows against a codebook scaled to max norm 1: every dot is in [-1, 1]
            scale = rnorm.clamp_min(1e-30)
            dots = ((r / scale[:, None]).to(sdtype) @ book.T).float()
            dots.mul_((scale * p["cmax"]).float()[:, None])
        approx = dots.mul_(-2).add_(p["n32"])  # in place: one [n, K] fp32 buffer
        del dots
        # ---- error bound per row: operand rounding + accumulation, ||c||^2 rounding,
        # and the fp32 rounding of the approximate values themselves
        u = _UNIT_ROUNDOFF[sdtype]
        # fp16/bf16 matmuls also round their output (|dot| <= 1 after scaling) to the search
        # dtype: one more u, on CPU (bf16 result) as with cuBLAS half/bf16 GEMMs
        delta = (3 if sdtype in (torch.float16, torch.bfloat16) else 2) * u + u * u + 4 * math.sqrt(c) * 2.0**-24
        cmax = p["cmax"]
        bound = 2 * delta * rnorm * cmax + 2.0**-22 * (cmax * cmax + 2 * rnorm * cmax)
        return approx, bound

    def _search(
        self, r: torch.Tensor, r64: torch.Tensor, p: dict, sdtype, cand: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One precision level.  Approximate distances ``||c||^2 - 2 r.c`` in the search
        dtype; every code within ``2 * bound`` of the approximate best is a candidate.
        One candidate: it is the exact argmin, no re-rank needed.  Up to ``cand``: they are
        re-ranked in float64.  More: the row is not certified (next level).
        ``r`` is the residual centred on the codebook mean, ``r64`` the plain one.
        Returns (codes, certified) per row."""
        approx, bound = self._approx(r, p, sdtype)
        best_val, idx, count = candidate_window(approx, bound)
        ok = (count == 1) & torch.isfinite(best_val)
        # ---- a few candidates within the window: exact float64 re-rank (lowest index on ties)
        few = ((count > 1) & (count <= cand) & torch.isfinite(best_val)).nonzero().squeeze(1)
        if few.numel():
            top_idx = approx[few].topk(cand, dim=1, largest=False).indices
            sidx, _ = top_idx.sort(dim=1)
            idx[few] = rerank(r64[few], p["orig"], sidx)
            ok[few] = True
        return idx, ok

    def _search_fused(
        self, r: torch.Tensor, r64: torch.Tensor, p: dict, plan: FusedPlan, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused search at ``depth`` (fused_triton), with the bound of :meth:`_search` for the
        kernel's ``delta``.  First pass, the ``plan.top`` nearest per row: one code within the
        window is the exact argmin; 2 to top - 1 with the largest kept one outside are the
        complete candidate list, re-ranked in float64.  The other rows: the collect pass lists
        the window's codes (the same precision, so the same bound: the exact argmin is among
        them), re-ranked in float64 when at most ``plan.cap``.  Returns (codes, settled, settled
        by the first pass) per row; rows not settled need the full float64 search."""
        from asvr.tokenizer.rvq import fused_triton

        prec, tiles = plan.at(depth)
        n, c = r.shape
        a_ops = fused_triton.split_operand(r.float(), prec)
        b_ops = self._book_in(p, ("fused", prec))
        vals, ids = fused_triton.nearest(a_ops, b_ops, p["n32"], prec, tiles=tiles, top=plan.top)
        rnorm = r.norm(dim=1)
        cmax = p["cmax"]
        bound = 2 * fused_triton.delta(prec, c) * rnorm * cmax + 2.0**-22 * (cmax * cmax + 2 * rnorm * cmax)
        window = fp32_window(vals[:, 0], bound)
        inside = vals <= window[:, None]
        count = inside.sum(dim=1)
        finite = torch.isfinite(vals[:, 0])
        idx = ids[:, 0].clone()
        ok = (count == 1) & finite
        few = ((count > 1) & ~inside[:, -1] & finite).nonzero().squeeze(1)
        if few.numel():
            idx[few] = rerank_listed(r64[few], p["orig"], torch.where(inside[few], ids[few], -1))
            ok[few] = True
        first = ok.clone()
        rest = (~ok & finite).nonzero().squeeze(1)
        if plan.collect and rest.numel():
            a_rest = (a_ops[0][rest], a_ops[1][rest]) if prec == "bf16x3" else (a_ops[0][rest],) * 2
            cnt, listed = fused_triton.collect(a_rest, b_ops, p["n32"], window[rest], prec, cap=plan.cap, tiles=tiles)
            good = (cnt >= 1) & (cnt <= plan.cap)  # >= 1 always holds in exact arithmetic; never trusted
            sel = rest[good]
            if sel.numel():
                idx[sel] = rerank_listed(r64[sel], p["orig"], listed[good])
                ok[sel] = True
        return idx, ok, first

    def _encode_block(self, x: torch.Tensor, sdtype, cand: int) -> tuple[torch.Tensor, list[int], list[int], int]:
        """Greedy RVQ of one block of rows.  Rows whose candidate list is not certified
        go down a cascade: the search dtype, then fp32, then a full float64 search (fused:
        the first pass, the collect pass, then full float64).
        Returns (codes, uncertified rows per depth, collected rows per depth, full searches)."""
        n, c = x.shape
        k_all = self.codebook_size
        cand = max(1, min(cand, k_all))
        prepared = self._prepared(x.device)
        fused = isinstance(sdtype, FusedPlan)
        levels = [sdtype] + ([torch.float32] if sdtype is not torch.float32 and not fused else [])
        r = x.to(torch.float64)
        codes = torch.empty((n, self.depth), dtype=torch.long, device=x.device)
        fallback, collected, full = [0] * self.depth, [0] * self.depth, 0
        for d in range(self.depth):
            p = prepared[0 if len(prepared) == 1 else d]
            rc = r - p["mean"]
            if cand >= k_all:
                idx = full_search(rc, r, p)
            else:
                if fused:
                    idx, ok, first = self._search_fused(rc, r, p, sdtype, d)
                    fallback[d] = int((~first).sum())
                    collected[d] = int((ok & ~first).sum())
                else:
                    idx, ok = self._search(rc, r, p, levels[0], cand)
                    fallback[d] = int((~ok).sum())
                for level in levels[1:]:
                    bad = (~ok).nonzero().squeeze(1)
                    if not bad.numel():
                        break
                    # at least 8 candidates at the fp32 level, never more than the codebook holds
                    idx[bad], ok_b = self._search(rc[bad], r[bad], p, level, min(max(cand, 8), k_all))
                    ok[bad] = ok_b
                bad = (~ok).nonzero().squeeze(1)
                if bad.numel():
                    full += int(bad.numel())
                    idx[bad] = full_search(rc[bad], r[bad], p)
            codes[:, d] = idx
            r = r - p["orig"][idx]
        return codes, fallback, collected, full
