"""The one-process fast path of asvr-train (issue 26), on CPU with real DeepSpeed (gloo, fp32).

``--zero 0`` (what ``--zero auto`` picks on one process) against ``--zero 2``, the path every run
took before: the same losses (rtol 1e-5: fp32 on both sides, only the summation order of the
clip norm and of the optimizer's kernels differ) and the same trained weights (atol 1e-5) after
4 steps of 2 accumulated micro-batches with clipping active at every step (``--grad-clip 0.05``,
well under the tiny model's gradient norm).  The prefetch thread changes no number (bit for bit
against ``--no-prefetch``); ``--compile`` gives the eager run's losses (rtol 1e-4: inductor's
fused kernels reorder float sums).  Bitwise resume over the fast path is
tests/test_train_trainer.py's (``--zero auto`` is the default there).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from asvr.train.cli import main
from asvr.train.config import TrainConfig
from asvr.train.data.prefetch import Prefetcher
from asvr.train.loop.engine import deepspeed_config, zero_stage
from asvr.train.loop.metrics import read_metrics
from train_corpus import make_corpus, train_args

COMMON = ["--max-steps", "4", "--grad-accum", "2", "--grad-clip", "0.05", "--caption-free-ratio", "0.25"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


@pytest.fixture(scope="module")
def runs(corpus, tiny_tokenizer_dir, tmp_path_factory):
    """--zero 0 and --zero 2, same data and seed, checkpoint at step 2 and 4, exported."""
    root = tmp_path_factory.mktemp("fast")
    for zero in ("0", "2"):
        args = train_args(corpus, tiny_tokenizer_dir, root / f"z{zero}", *COMMON, "--zero", zero, "--save-every", "2")
        assert main(args) == 0
    return root


def final_weights(run) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "final").rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert out
    return out


def test_fast_path_equals_zero2(runs):
    a, b = read_metrics(runs / "z0"), read_metrics(runs / "z2")
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    for key in ("loss", "loss_text", "loss_visual", "loss_visual_d1"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-5, err_msg=key)
    assert a[-1]["loss"] != a[0]["loss"]  # the steps moved the weights (the comparison is not of step 1 only)
    wa, wb = final_weights(runs / "z0"), final_weights(runs / "z2")
    assert wa.keys() == wb.keys()
    moved = 0
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=0, atol=1e-5, msg=k)
        moved += int(not torch.equal(wa[k], wb[k]))
    assert moved  # not two copies of the initial weights
    for zero in (0, 2):  # each checkpoint records its stage (a resume with --zero auto keeps it)
        done = json.loads((runs / f"z{zero}" / "checkpoints" / "step00000004" / "complete.json").read_text())
        assert done["zero"] == zero


class Quadratic(torch.nn.Module):
    """A model in the trainer's calling convention, ``forward(batch) -> (loss, metrics)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 4))
        self.b = torch.nn.Parameter(torch.zeros(4))

    def forward(self, batch):
        x, y = batch
        loss = ((x @ self.w + self.b - y) ** 2).mean()
        return loss, {"loss": loss}


def reference_weights(batches, cfg, total: int, clip: bool) -> torch.Tensor:
    """A plain PyTorch loop: accumulate ``grad_accum`` mean losses / grad_accum, clip the norm,
    AdamW (foreach), the same warmup + cosine schedule."""
    import math

    from asvr.train.loop.engine import cosine_with_warmup

    m = Quadratic()
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, warmup, cfg.min_lr_ratio))
    for step in range(total):
        for x in batches[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]:
            (m(x)[0] / cfg.grad_accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
    return torch.cat([m.w.detach().flatten(), m.b.detach()])


@pytest.mark.parametrize("stage", [0, 2])
def test_stepper_equals_a_plain_torch_loop(stage):
    """Stepper over a real DeepSpeed engine (one gloo process) at the fast path's stage 0 and at
    ZeRO-2: the weights of a plain loop with clipping after 3 steps of 2 micro-batches (fp32,
    atol 1e-6), and not those of the loop without clipping (the gradient norms swing 100x
    between batches, so clipping at 0.5 changes the AdamW steps)."""
    from asvr.train.loop.distributed import init_distributed
    from asvr.train.loop.engine import Stepper, build_engine

    init_distributed()
    cfg = TrainConfig(model="m", tokenizer="t", codes="c", data="d", output_dir="o", zero=str(stage))
    cfg.lr, cfg.grad_accum, cfg.grad_clip, cfg.micro_batch_size = 0.05, 2, 0.5, 8
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 6, generator=g) * (30 if i % 3 == 0 else 0.3), torch.randn(8, 4, generator=g)) for i in range(6)
    ]
    model = Quadratic()
    groups = [{"params": list(model.parameters()), "name": "all"}]
    engine = build_engine(cfg, torch.device("cpu"), model, groups, 3, announce=False, stage=stage)
    stepper = Stepper(engine, cfg, stage, 1)
    assert stepper.fast == (stage == 0)
    for x in batches:
        stepper(x)
    got = torch.cat([model.w.detach().flatten(), model.b.detach()])
    torch.testing.assert_close(got, reference_weights(batches, cfg, 3, clip=True), rtol=0, atol=1e-6)
    assert (got - reference_weights(batches, cfg, 3, clip=False)).abs().max() > 1e-3


def test_prefetch_changes_no_number(corpus, tiny_tokenizer_dir, runs, tmp_path):
    out = tmp_path / "noprefetch"
    assert (
        main(train_args(corpus, tiny_tokenizer_dir, out, *COMMON, "--zero", "0", "--no-prefetch", "--no-export")) == 0
    )
    a, b = read_metrics(runs / "z0"), read_metrics(out)
    for key in ("loss", "loss_text", "loss_visual", "lr", "epoch"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # exact


def test_resume_with_another_explicit_stage_is_one_line(corpus, tiny_tokenizer_dir, runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs / "z0", run)
    args = train_args(corpus, tiny_tokenizer_dir, run, *COMMON, "--zero", "2", "--resume", "auto", "--max-steps", "6")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "asvr-train: error: --resume: step00000004 was saved with --zero 0, this run asks --zero 2; resume with --zero 0 (or auto)"
    )


@pytest.mark.slow  # ~2 min of inductor compilation on 2 cores
def test_compile_gives_the_eager_losses(corpus, tiny_tokenizer_dir, runs, tmp_path):
    out = tmp_path / "compiled"
    args = [*COMMON, "--zero", "0", "--compile", "--no-export", "--max-steps", "2"]
    assert main(train_args(corpus, tiny_tokenizer_dir, out, *args)) == 0
    a, b = read_metrics(runs / "z0")[:2], read_metrics(out)
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4)


@pytest.mark.parametrize(
    ("zero", "world", "saved", "want"),
    [("auto", 1, None, 0), ("auto", 2, None, 2), ("auto", 8, None, 2), ("auto", 1, 2, 2), ("auto", 4, 0, 0)]
    + [("1", 1, None, 1), ("3", 2, None, 3), ("0", 4, None, 0)],
)
def test_zero_stage_choice(zero, world, saved, want):
    cfg = TrainConfig(model="m", tokenizer="t", codes="c", data="d", output_dir="o", zero=zero)
    assert zero_stage(cfg, world, saved) == want


def test_deepspeed_config_per_stage():
    """On CUDA the fast path turns DeepSpeed's bf16 engine off for autocast over fp32 weights and
    clips itself; the ZeRO stages keep DeepSpeed's bf16 and clipping."""
    cfg = TrainConfig(model="m", tokenizer="t", codes="c", data="d", output_dir="o", grad_clip=0.5)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fast = deepspeed_config(cfg, cuda, 0)
    assert fast["bf16"] == {"enabled": False} and fast["gradient_clipping"] == 0.0
    assert fast["torch_autocast"]["enabled"] and fast["torch_autocast"]["dtype"] == "bfloat16"
    assert fast["zero_optimization"] == {"stage": 0}
    for stage in (1, 2, 3):
        ds = deepspeed_config(cfg, cuda, stage)
        assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5 and "torch_autocast" not in ds
        assert ds["zero_optimization"] == {"stage": stage}
    assert deepspeed_config(cfg, cpu, 0)["bf16"] == {"enabled": False}
    assert "torch_autocast" not in deepspeed_config(cfg, cpu, 0)


class CountingLoader:
    """A loader of integers with a state (its position), as PackedLoader exposes it; ``fail_at``
    raises there."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.position, self.epoch = n, fail_at, 0, 0

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def __iter__(self):
        while True:
            if self.position == self.fail_at:
                raise ValueError(f"bad batch {self.position}")
            x = self.position
            self.position += 1
            if self.position == self.n:
                self.position, self.epoch = 0, self.epoch + 1
            yield x


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetcher_state_is_that_of_the_consumed_batch(enabled):
    feed = Prefetcher(CountingLoader(3), torch.device("cpu"), enabled=enabled)
    ref = CountingLoader(3)
    ref_it = iter(ref)
    try:
        assert feed.state == ref.state_dict()
        for _ in range(7):
            assert next(feed) == next(ref_it)
            assert (feed.state, feed.epoch) == (ref.state_dict(), ref.epoch)  # not the batch built ahead
    finally:
        feed.close()


def test_prefetcher_raises_the_loader_error_at_its_batch():
    feed = Prefetcher(CountingLoader(10, fail_at=2), torch.device("cpu"))
    try:
        assert [next(feed), next(feed)] == [0, 1]
        with pytest.raises(ValueError, match="bad batch 2"):
            next(feed)
    finally:
        feed.close()
