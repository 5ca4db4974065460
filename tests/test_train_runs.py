"""asvr-train paths the other trainer tests never reach, on an LLM with attention
dropout (so the RNG matters): bitwise resume from an explicit tag compared on
the *weights*, checkpoint pruning, the learning-rate schedule's values, the
loss plot's data, gradient clipping, and the ZeRO-3 export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from asvr.train.cli import main
from asvr.train.loop.metrics import loss_figure, read_metrics
from train_corpus import make_corpus, train_args

LR = 1e-3
COMMON = [
    "--stage",
    "sft",
    "--max-steps",
    "4",
    "--save-every",
    "1",
    "--lr",
    str(LR),
    "--warmup-ratio",
    "0.5",
    "--min-lr-ratio",
    "0.1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    from asvr.demo.tiny_llm import make_tiny_llm

    root = tmp_path_factory.mktemp("corpus_dropout")
    llm = make_tiny_llm(root / "llm", "llama", ["a picture of a thing", "What is in image", "hello there"])
    cfg = json.loads((llm / "config.json").read_text())
    cfg["attention_dropout"] = 0.2  # training consumes the torch RNG
    (llm / "config.json").write_text(json.dumps(cfg))
    return make_corpus(root, tiny_tokenizer, llm=llm)


def _args(corpus, tok_dir, out, *extra, quiet=True):
    return train_args(corpus, tok_dir, out, *extra, data=corpus.sft, quiet=quiet)


@pytest.fixture(scope="module")
def straight(corpus, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(_args(corpus, tiny_tokenizer_dir, out, *COMMON, "--keep-checkpoints", "2")) == 0
    return out


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def test_keep_checkpoints_prunes_the_oldest(straight):
    assert sorted(p.name for p in (straight / "checkpoints").glob("step*")) == ["step00000003", "step00000004"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step00000004"


def test_learning_rate_schedule_values(straight):
    """4 steps, warmup 2 (ratio 0.5), cosine to 10%: computed by hand."""
    lrs = [r["lr"] for r in read_metrics(straight)]
    np.testing.assert_allclose(lrs, [0.5 * LR, LR, LR, (0.1 + 0.9 * 0.5) * LR], rtol=1e-9)


def test_loss_plot_shows_the_logged_losses(straight):
    rows = read_metrics(straight)
    fig = loss_figure(rows)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert set(lines) == {"loss", "loss_text", "loss_visual"}
    for key, ln in lines.items():
        np.testing.assert_array_equal(ln.get_xdata(), [r["step"] for r in rows])
        np.testing.assert_array_equal(ln.get_ydata(), [r[key] for r in rows])
    assert (straight / "loss.png").stat().st_size > 1000


def test_resume_from_an_explicit_tag_gives_the_same_weights(corpus, tiny_tokenizer_dir, straight, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert main(_args(corpus, tiny_tokenizer_dir, out, *COMMON, "--keep-checkpoints", "0", "--stop-after", "3")) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"
    capsys.readouterr()
    # not the newest checkpoint: step 2, so steps 3 and 4 run again
    assert main(_args(corpus, tiny_tokenizer_dir, out, *COMMON, "--resume", "step00000002", quiet=False)) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: dropout masks continue from the saved RNG
    straight_rows, resumed_rows = read_metrics(straight), read_metrics(out)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in straight_rows] == [r["loss"] for r in resumed_rows]


def test_zero3_export_and_gradient_clipping(corpus, tiny_tokenizer_dir, straight, tmp_path):
    """One ZeRO-3 step from the straight run's weights with gradients clipped to a norm of
    1e-10: Adam's first step moves each weight by ``lr * g / (|g| + eps)``, at most
    ``lr / 100`` with eps 1e-8 (unclipped, about ``lr``).  The export must gather the
    partitioned weights: same keys, shapes, values within that step.  (Without a zero
    persistence threshold ZeRO-3 keeps every tensor of a tiny model whole, and the
    export would never see a partitioned one.)"""
    out = tmp_path / "z3"
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    assert (
        main(
            _args(
                corpus,
                tiny_tokenizer_dir,
                out,
                "--stage",
                "sft",
                "--deepspeed",
                str(ds),
                "--max-steps",
                "1",
                "--init-from",
                str(straight),
                "--grad-clip",
                "1e-10",
                "--lr",
                str(LR),
            )
        )
        == 0
    )
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        moved = max(moved, float((a[k] - b[k]).abs().max()))
    assert 0 < moved < LR / 50, moved
