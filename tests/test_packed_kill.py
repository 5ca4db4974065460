"""kill -9 (issue 25): ``asvr-pipeline pack``'s driver SIGKILLed once a unit is committed, then
rerun, gives the uninterrupted run's manifest and shard bytes; ``asvr-train --packed``
SIGKILLed after a checkpoint, then ``--resume auto``, gives the uninterrupted run's losses bit
for bit.  Real processes, real signals (no marker or shard deleted by hand)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from asvr.pipeline.cli import main as pipeline_main
from asvr.train.cli import main
from asvr.train.loop import checkpoint
from asvr.train.loop.metrics import read_metrics
from train_corpus import TINY_HEAD, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer, n_images=24, n_captioned=20)


def pack_args(corpus, out, unit: int = 1):
    return ["pack", "--codes", str(corpus.codes), "--data", str(corpus.sft), "--model", str(corpus.llm),
            "--out", str(out), "--max-len", "256", "--template", "vicuna_v1", "--caption-free-ratio", "0.1",
            "--unit-size", str(unit), "--num-cpus", "2", "--seed", "4", "--no-progress"]  # fmt: skip


def _env() -> dict:
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")
    return {k: v for k, v in os.environ.items() if k not in dist_vars}


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` (only it) as soon as ``ready()``; then whatever it left in its session."""
    try:
        end = time.monotonic() + timeout
        while not ready() and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a Ray worker the driver's reaper did not reach yet
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def clean_units(corpus, tmp_path_factory):
    """The uninterrupted pack of one conversation per unit (more than 10 units)."""
    clean = tmp_path_factory.mktemp("clean") / "clean"
    assert pipeline_main(pack_args(corpus, clean)) == 0
    assert json.loads((clean / "manifest.json").read_text())["units"] > 10
    return clean


def _same_as(out, clean) -> None:
    assert (out / "manifest.json").read_text() == (clean / "manifest.json").read_text()
    want = sorted(p.name for p in clean.glob("packed-*.parquet"))
    assert sorted(p.name for p in out.glob("packed-*.parquet")) == want
    for name in want:
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert (out / "failures.parquet").read_bytes() == (clean / "failures.parquet").read_bytes()
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.timeout(600)
def test_pack_sigterm_stops_in_one_line_and_the_rerun_equals_the_uninterrupted_run(corpus, clean_units, tmp_path):
    """A scheduler's SIGTERM to ``pack``'s driver: exit 143 and one line saying how to resume (not
    Ray's native dump: ``ray.init`` installs its own SIGTERM handler, which the job replaces)."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "asvr.pipeline.cli", *pack_args(corpus, out)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 300
        while not any((out / ".units").glob("unit-*.json")) and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a Ray worker left in its session
        except ProcessLookupError:
            pass
    assert not json.loads((out / "manifest.json").read_text())["complete"], "finished before the signal"
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"asvr-pipeline pack: stopped by SIGTERM; (\d+) finished units are kept in {re.escape(str(out))}; "
        "rerun the same command to resume",
        last,
    ), err[-2000:]
    kept = int(re.search(r"SIGTERM; (\d+)", last).group(1))
    assert kept == len(list((out / ".units").glob("unit-*.json"))) >= 1

    assert pipeline_main(pack_args(corpus, out)) == 0
    _same_as(out, clean_units)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pack_killed_mid_run_then_rerun_equals_the_uninterrupted_run(corpus, clean_units, tmp_path):
    clean = clean_units
    n_units = json.loads((clean / "manifest.json").read_text())["units"]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "asvr.pipeline.cli", *pack_args(corpus, out)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _kill_when(proc, lambda: any((out / ".units").glob("unit-*.json")))
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill; nothing was tested"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    left = len(list((out / ".units").glob("unit-*.json")))
    assert 1 <= left < n_units

    assert pipeline_main(pack_args(corpus, out)) == 0
    _same_as(out, clean)


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "p"
    assert pipeline_main(pack_args(corpus, out, unit=64)) == 0
    return out


def train_args(corpus, tok_dir, packed, out):
    return ["--model", str(corpus.llm), "--tokenizer", str(tok_dir), "--packed", str(packed),
            "--output-dir", str(out), "--max-len", "256", "--template", "vicuna_v1", "--seed", "4",
            *TINY_HEAD, "--quiet", "--no-export", "--max-steps", "12", "--save-every", "2",
            "--log-every", "1", "--keep-checkpoints", "0", "--shuffle-buffer", "64"]  # fmt: skip


def _child(args: list[str]) -> subprocess.Popen:
    """``asvr-train`` in its own process with this process's torch thread count: the resumed and
    the straight runs train here, and float sums depend on the thread count."""
    import torch

    code = (
        f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
        "import sys; from asvr.train.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        start_new_session=True,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_killed_after_a_checkpoint_then_resume_auto_is_bitwise(corpus, tiny_tokenizer_dir, packed, tmp_path):
    import asvr.train.loop.trainer  # noqa: F401 - imported here before the child starts: the poll below is quick

    run = tmp_path / "killed"
    args = train_args(corpus, tiny_tokenizer_dir, packed, run)
    proc = _child(args)
    _kill_when(proc, lambda: bool(checkpoint.complete_tags(run / "checkpoints")))
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill; nothing was tested"
    done = checkpoint.complete_tags(run / "checkpoints")
    assert done and done[-1] != checkpoint.tag_for(12)

    assert main([*args, "--resume", "auto"]) == 0
    straight = tmp_path / "straight"
    assert main(train_args(corpus, tiny_tokenizer_dir, packed, straight)) == 0
    want, got = read_metrics(straight), read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, 13))
    for key in ("loss", "loss_text", "loss_visual", "lr", "epoch"):
        assert [r[key] for r in got] == [r[key] for r in want], key  # exact
