"""Codebook quality per depth: reconstruction, utilisation and usage.

For features ``x`` and their exact greedy codes, after each depth ``d``
(numbered from 0, as everywhere in asvr: ``--code D:K``, shards, training
metrics ``loss_visual_d0``; the row of depth ``d`` measures the
reconstruction from depths ``0..d``):

* ``rel_error``: ``sum ||x - x_hat_d||^2 / sum ||x||^2`` (float64);
* ``cosine``: mean cosine similarity of ``x`` and ``x_hat_d``;
* ``utilisation``: share of the ``K`` codes used at depth ``d``;
* ``entropy_bits`` / ``perplexity``: of the code histogram at depth ``d``
  (perplexity ``2^H`` is the number of equally used codes it is worth);
* ``dead_codes``: codes never used at depth ``d``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from asvr.core.atomic import atomic_path


@dataclass
class DepthMetrics:
    depth: int
    rel_error: float
    cosine: float
    utilisation: float
    entropy_bits: float
    perplexity: float
    dead_codes: int


@dataclass
class ValidationReport:
    n_images: int
    n_vectors: int
    codebook_size: int
    shared_codebook: bool
    per_depth: list[DepthMetrics]
    usage: list[list[int]]
    """code histogram per depth ``[D][K]``"""
    failures: list[dict]

    def to_dict(self, with_usage: bool = True) -> dict:
        d = asdict(self)
        if not with_usage:
            d.pop("usage")
        return d


def usage_stats(codes: np.ndarray, k: int) -> tuple[np.ndarray, float, float, int]:
    """codes ``[N]`` -> (histogram, entropy bits, perplexity, dead codes)."""
    hist = np.bincount(codes, minlength=k)
    p = hist[hist > 0] / max(1, hist.sum())
    h = float(-(p * np.log2(p)).sum())
    return hist, h, float(2.0**h), int((hist == 0).sum())


def depth_metrics(x: torch.Tensor, codes: torch.Tensor, quantizer) -> tuple[list[DepthMetrics], list[list[int]]]:
    """``x [N, C]`` float32 and codes ``[N, D]`` from ``quantizer`` (a ResidualQuantizer)."""
    x64 = x.double()
    cum = quantizer.cumulative(codes).double()  # [N, D, C]
    total = float((x64 * x64).sum()) or 1.0
    k = quantizer.codebook_size
    xn = x64.norm(dim=1)
    out, usage = [], []
    for d in range(codes.shape[1]):
        rec = cum[:, d]
        err = float(((x64 - rec) ** 2).sum()) / total
        cos = float(((x64 * rec).sum(1) / (xn * rec.norm(dim=1)).clamp_min(1e-30)).mean())
        hist, h, ppl, dead = usage_stats(codes[:, d].numpy(), k)
        out.append(
            DepthMetrics(
                depth=d,
                rel_error=err,
                cosine=cos,
                utilisation=float((hist > 0).mean()),
                entropy_bits=h,
                perplexity=ppl,
                dead_codes=dead,
            )
        )
        usage.append(hist.tolist())
    return out, usage


def error_cosine_figure(report: ValidationReport, heading: str):
    """Relative error (left axis, solid) and mean cosine (right axis, dashed) against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [m.depth for m in report.per_depth]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(depths, [m.rel_error for m in report.per_depth], "o-", color="C0", label="relative error")
    ax.set_xlabel("depth d (reconstruction from depths 0..d)")
    ax.set_ylabel("relative reconstruction error", color="C0")
    ax.set_xticks(depths)
    ax2 = ax.twinx()
    ax2.plot(depths, [m.cosine for m in report.per_depth], "s--", color="C1", label="cosine")
    ax2.set_ylabel("mean cosine similarity", color="C1")
    ax.set_title(heading)
    fig.tight_layout()
    return fig


def plot_report(report: ValidationReport, out: Path, title: str = "") -> list[Path]:
    """error_cosine.png (:func:`error_cosine_figure`) and usage.png (counts by rank per depth, log
    scale, uniform line: the same plot as ``asvr-tokenizer inspect``)."""
    import matplotlib.pyplot as plt

    from asvr.tokenizer.codes.inspection import Usage, plot_usage

    name = f"{title}: " if title else ""
    heading = f"{name}{report.n_images} images, {report.n_vectors} vectors"
    fig = error_cosine_figure(report, heading)
    p1 = out / "error_cosine.png"
    with atomic_path(p1, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Title": heading})
    plt.close(fig)

    usage = Usage(np.asarray(report.usage, dtype=np.int64), report.n_images, report.n_vectors, None)
    p2 = plot_usage(
        usage, out / "usage.png", title=f"{name}code usage over {report.n_images} images ({report.n_vectors} patches)"
    )
    return [p1, p2]
