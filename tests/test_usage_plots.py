"""The usage and error/cosine plots hold the numbers they claim: the figure's
data (step heights, the uniform line, titles, line values) against counts and
errors computed here from the codes by numpy, not just "the PNG is not empty"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.patches import StepPatch
from PIL import Image

from asvr.tokenizer.codes.inspection import Usage, usage_figure
from asvr.tokenizer.rvq.quantizer import ResidualQuantizer, rvq_encode_reference
from asvr.tokenizer.rvq.validation import ValidationReport, depth_metrics, error_cosine_figure, plot_report


def _perplexity(c):
    p = c[c > 0] / c.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_usage_figure_draws_the_sorted_counts_and_the_uniform_share():
    counts = np.array([[5, 0, 9, 1, 0, 1], [0, 0, 16, 0, 0, 0]], np.int64)
    fig = usage_figure(Usage(counts, images=4, patches=16, preprocess="square"))
    assert fig._suptitle.get_text() == "code usage over 4 images (16 patches)"
    for d, ax in enumerate(fig.axes):
        (steps,) = [p for p in ax.patches if isinstance(p, StepPatch)]
        data = steps.get_data()
        want = np.sort(counts[d])[::-1]
        np.testing.assert_array_equal(data.values, np.maximum(want, 0.5))
        np.testing.assert_array_equal(data.edges, np.arange(7))
        assert data.baseline == 0.5
        (uniform,) = [ln for ln in ax.get_lines() if ln.get_label() == "uniform"]
        assert list(uniform.get_ydata()) == [16 / 6, 16 / 6]
        used = int((counts[d] > 0).sum())
        ppl = _perplexity(counts[d])
        assert ax.get_title() == f"depth {d}: used {used}/6, dead {6 - used}, perplexity {ppl:.1f}"
        assert ax.get_yscale() == "log" and ax.get_ylim() == pytest.approx((0.5, max(2.0, want[0] * 1.5)))
    assert [ax.get_title() for ax in fig.axes][1] == "depth 1: used 1/6, dead 5, perplexity 1.0"


def test_usage_figure_floors_a_tiny_uniform_share_for_the_log_scale():
    fig = usage_figure(Usage(np.array([[1] + [0] * 9]), images=1, patches=1, preprocess=None), "t")
    assert fig._suptitle.get_text() == "t"
    (uniform,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "uniform"]
    assert list(uniform.get_ydata()) == [0.5, 0.5]
    assert fig.axes[0].get_ylim() == pytest.approx((0.5, 2.0))


@pytest.fixture(scope="module")
def report():
    rng = np.random.default_rng(0)
    books = rng.standard_normal((3, 8, 6)) * np.array([1.0, 0.5, 0.25])[:, None, None]
    x = rng.standard_normal((200, 6))
    codes = rvq_encode_reference(x, books)
    q = ResidualQuantizer(torch.tensor(books, dtype=torch.float32))
    per_depth, usage = depth_metrics(torch.tensor(x, dtype=torch.float32), torch.tensor(codes), q)
    rep = ValidationReport(
        n_images=4, n_vectors=200, codebook_size=8, shared_codebook=False, per_depth=per_depth, usage=usage, failures=[]
    )
    return rep, x.astype(np.float32).astype(np.float64), books.astype(np.float32).astype(np.float64), codes


def test_validation_numbers_equal_numpy_on_the_codes(report):
    rep, x, books, codes = report
    rec = np.zeros_like(x)
    for d, m in enumerate(rep.per_depth):
        rec = rec + books[d][codes[:, d]]
        assert m.depth == d
        assert m.rel_error == pytest.approx(((x - rec) ** 2).sum() / (x**2).sum(), rel=1e-6)
        cos = (x * rec).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(rec, axis=1))
        assert m.cosine == pytest.approx(cos.mean(), rel=1e-6)
        hist = np.bincount(codes[:, d], minlength=8)
        assert rep.usage[d] == hist.tolist()
        assert m.dead_codes == int((hist == 0).sum()) and m.utilisation == (hist > 0).mean()
        p = hist[hist > 0] / hist.sum()
        assert m.entropy_bits == pytest.approx(-(p * np.log2(p)).sum()) and m.perplexity == pytest.approx(
            _perplexity(hist)
        )


def test_error_cosine_figure_plots_the_reported_values(report):
    rep = report[0]
    fig = error_cosine_figure(rep, "heading")
    err_ax, cos_ax = fig.axes
    (err,) = err_ax.get_lines()
    (cos,) = cos_ax.get_lines()
    assert (err.get_label(), cos.get_label()) == ("relative error", "cosine")
    for line in (err, cos):
        assert list(line.get_xdata()) == [0, 1, 2]
    assert list(err.get_ydata()) == [m.rel_error for m in rep.per_depth]
    assert list(cos.get_ydata()) == [m.cosine for m in rep.per_depth]
    assert err_ax.get_title() == "heading" and list(err_ax.get_xticks()) == [0, 1, 2]


def test_plot_report_writes_both_pngs_titled(report, tmp_path):
    paths = plot_report(report[0], tmp_path, title="tok")
    assert paths == [tmp_path / "error_cosine.png", tmp_path / "usage.png"]
    with Image.open(paths[0]) as im:
        assert im.text["Title"] == "tok: 4 images, 200 vectors"
    with Image.open(paths[1]) as im:
        assert im.text["Title"] == "tok: code usage over 4 images (200 patches)"
        assert im.size[1] > 3 * 150  # one panel per depth
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error_cosine.png", "usage.png"]  # no temp files
