"""Preemption and the run folder (issue 23): a real SIGTERM to a real DeepSpeed run saves a
checkpoint, says so in one line and exits 143; a second run into the same folder is refused
while the first holds it; after an empty ``latest``, a partial newer tag and a torn
metrics line, ``--resume auto`` picks the newest complete checkpoint, says why, and ends
with the losses of an uninterrupted run, bit for bit.  Plus the pieces on their own
(signals, the save clock, checkpoint choice and pruning, a full disk, unknown flags)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asvr.train.loop import checkpoint
from asvr.train.loop.checkpoint import COMPLETE, resume_choice, tag_for
from asvr.train.cli import main
from asvr.train.loop.metrics import read_metrics
from asvr.train.loop.preemption import Preempted, SaveClock, StopSignals
from train_corpus import make_corpus, train_args

COMMON = ["--max-steps", "6", "--grad-accum", "2", "--caption-free-ratio", "0.25", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


def _child(args: list[str]) -> subprocess.Popen:
    """``asvr-train`` in its own process, started as a shell starts it (see test_train_trainer's Ctrl-C test),
    with this process's torch thread count: the resumed and the straight runs train in this process, and
    float sums depend on the thread count (an earlier in-process codebook training may have changed it)."""
    import torch

    code = (
        f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
        "import signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT}); "
        "signal.signal(signal.SIGTERM, signal.SIG_DFL); signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from asvr.train.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by this session's runs
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    return subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env)


def _wait_rows(proc: subprocess.Popen, out: Path, rows: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if len(read_metrics(out)) >= rows:
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {rows} metric rows: {proc.communicate()[1][-2000:]}")


def test_sigterm_saves_and_resume_auto_after_faults_equals_the_uninterrupted_run(
    corpus, tiny_tokenizer_dir, tmp_path, capsys
):
    import asvr.train.loop.trainer  # noqa: F401 - imported before the child trains: the lock check below is quick

    out = tmp_path / "preempted"
    args = train_args(corpus, tiny_tokenizer_dir, out, *COMMON, "--keep-checkpoints", "0")
    proc = _child(args)
    try:
        _wait_rows(proc, out, 1)
        proc.send_signal(signal.SIGSTOP)  # frozen mid-run, its lock held: the check cannot race the run's end
        # a second run into the same folder while the first trains: refused, nothing touched
        assert main(args) == 2
        assert capsys.readouterr().err == (
            f"asvr-train: error: {out} is being written by another asvr-train run (one run per --output-dir)\n"
        )
        proc.send_signal(signal.SIGTERM)  # pending until it runs again: delivered inside a training step
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    tags = checkpoint.complete_tags(out / "checkpoints")
    assert len(tags) == 1, (tags, err[-2000:])  # no --save-every: the SIGTERM's checkpoint only
    k = int(tags[0].removeprefix("step"))
    assert 1 <= k < 6
    assert err.splitlines()[-1] == (
        f"asvr-train: SIGTERM at step {k}: saved checkpoint {tag_for(k)} in {out}/checkpoints; "
        "rerun the same command with --resume auto to continue"
    )
    assert "Traceback" not in err and [r["step"] for r in read_metrics(out)] == list(range(1, k + 1))

    # faults: `latest` emptied (a kill during DeepSpeed's write of it), a newer tag cut short,
    # a torn last line of metrics.jsonl
    ckpt = out / "checkpoints"
    (ckpt / "latest").write_text("")
    partial = ckpt / tag_for(k + 1)
    shutil.copytree(ckpt / tags[0], partial)
    (partial / COMPLETE).unlink()
    next(partial.glob("*model_states.pt")).write_bytes(b"cut")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": ' + str(k + 1) + ', "loss": 0.12')
    assert main(args + ["--resume", tag_for(k + 1)]) == 2  # the cut-short tag by name: one line
    assert capsys.readouterr().err == (
        f"asvr-train: error: --resume {tag_for(k + 1)}: {partial} is incomplete (no completion marker: a save "
        f"cut short); complete checkpoints: {tags[0]}\n"
    )
    assert main(args + ["--resume", "auto"]) == 0
    assert capsys.readouterr().err == (
        f"--resume auto: {ckpt / 'latest'} is empty (a save cut short); resuming from {tags[0]}, "
        "the newest complete checkpoint\n"
    )
    assert not partial.exists()  # pruned once a complete checkpoint was written after it
    assert checkpoint.complete_tags(ckpt) == [tags[0], tag_for(6)] and (ckpt / "latest").read_text() == tag_for(6)

    # the uninterrupted run; --resume auto in a fresh folder says it starts at step 0
    straight = tmp_path / "straight"
    assert main(train_args(corpus, tiny_tokenizer_dir, straight, *COMMON, "--resume", "auto")) == 0
    assert capsys.readouterr().err == (
        f"--resume auto: no complete checkpoint in {straight / 'checkpoints'}, starting from step 0\n"
    )
    want, got = read_metrics(straight), read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, 7))
    for key in ("loss", "loss_text", "loss_visual", "lr", "epoch"):
        assert [r[key] for r in got] == [r[key] for r in want], key  # exact


def test_stop_signals_defer_inside_the_loop_and_raise_outside():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what a library run earlier in the session set
    with StopSignals() as stop:
        with pytest.raises(Preempted) as e:  # before the loop: nothing to save, stop at once
            signal.raise_signal(signal.SIGUSR1)
        assert (e.value.exit_code, e.value.name, e.value.saved) == (138, "SIGUSR1", None)
        with stop.deferred():
            signal.raise_signal(signal.SIGTERM)
            assert stop.received == signal.SIGTERM  # only noted: the step ends and a checkpoint is written
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    assert Preempted(15, "step00000007", 7).message("R", None) == (
        "SIGTERM at step 7: saved checkpoint step00000007 in R/checkpoints; "
        "rerun the same command with --resume auto to continue"
    )
    assert Preempted(10).message("R", None) == (
        "SIGUSR1 before the first checkpoint: nothing saved in R; rerun the same command to start"
    )
    assert Preempted(15).message("R", "step00000004") == (
        "SIGTERM outside the training steps: nothing new to save; rerun the same command with --resume auto "
        "to continue from step00000004 in R/checkpoints"
    )


def test_save_clock_by_steps_by_minutes_and_on_a_signal():
    now = [0.0]
    stop = StopSignals()
    clock = SaveClock(every_steps=3, every_minutes=30, signals=stop, clock=lambda: now[0])
    got = []
    for step, t in zip(range(1, 9), [60, 120, 180, 1979, 1981, 2000, 3799, 3801]):
        now[0] = t
        got.append(clock.poll(step)[0])
    # by count at steps 3 and 6; by time 30 min after the last checkpoint of either kind: steps 5, 8
    assert got == [False, False, True, False, True, True, False, True]
    stop.received = signal.SIGTERM
    assert clock.poll(9) == (True, signal.SIGTERM)
    reduced = SaveClock(every_steps=0, every_minutes=0, signals=StopSignals(), reduce_max=lambda v: [0, 10])
    assert reduced.poll(1) == (True, 10)  # another rank got SIGUSR1: this one saves and stops too


def _tag(ckpt: Path, step: int, complete: bool = True, states: bool = True) -> Path:
    d = ckpt / tag_for(step)
    d.mkdir(parents=True)
    if states:
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (d / "rng-rank0.pt").write_bytes(b"x")
    if complete:
        (d / COMPLETE).write_text("{}")
    return d


def test_resume_choice_and_pruning_keep_the_newest_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert resume_choice(tmp_path) == (None, f"--resume auto: no complete checkpoint in {ckpt}, starting from step 0")
    _tag(ckpt, 2)
    _tag(ckpt, 4)
    _tag(ckpt, 6, complete=False)  # a save cut short after DeepSpeed wrote its files
    why = "the newest complete checkpoint"
    assert resume_choice(tmp_path) == (
        tag_for(4),
        f"--resume auto: {ckpt / 'latest'} is missing; resuming from step00000004, {why}",
    )
    (ckpt / "latest").write_text(tag_for(9))
    assert (
        resume_choice(tmp_path)[1]
        == f"--resume auto: {ckpt / 'latest'} names step00000009, which is not there; resuming from step00000004, {why}"
    )
    (ckpt / "latest").write_text(tag_for(6))
    assert resume_choice(tmp_path)[1] == (
        f"--resume auto: {ckpt / 'latest'} names step00000006, which is incomplete (a save cut short); "
        f"resuming from step00000004, {why}"
    )
    (ckpt / "latest").write_text(tag_for(2) + "\n")
    assert resume_choice(tmp_path) == (tag_for(2), "")  # latest names a complete tag: DeepSpeed's rule
    checkpoint.prune(ckpt, 1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", tag_for(4)]
    # a run folder from before the marker: model states + rng file count as complete
    old = tmp_path / "old" / "checkpoints"
    _tag(old, 2, complete=False)
    _tag(old, 3, complete=False, states=False)
    assert checkpoint.complete_tags(old) == [tag_for(2)]
    _tag(old, 4)
    _tag(old, 5, complete=False)  # newer than a marked tag: a cut-short save, not an old one
    assert checkpoint.complete_tags(old) == [tag_for(2), tag_for(4)]
    checkpoint.prune(old, 0)
    assert sorted(p.name for p in old.iterdir()) == [tag_for(2), tag_for(4)]


def test_a_torn_last_metrics_line_is_skipped_a_broken_middle_one_named(tmp_path):
    from asvr.train.loop.metrics import MetricsError, MetricsLogger

    rows = [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_metrics(tmp_path) == rows
    MetricsLogger(tmp_path, True, resume_step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(rows[0]) + "\n"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(MetricsError) as e:
        read_metrics(tmp_path)
    assert str(e.value) == f"{tmp_path / 'metrics.jsonl'}: line 2 is not a metrics record; fix or remove it"


def _mount_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KB tmpfs (needs root to mount; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "256k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_naming_it(small_disk):
    from asvr.train.loop.run_folder import DiskFullError, disk_errors

    target = small_disk / "run" / "checkpoints"
    target.mkdir(parents=True)
    with pytest.raises(DiskFullError) as e:
        with disk_errors(target, "a checkpoint", "free space, then rerun with --resume auto"):
            (target / "big").write_bytes(b"\0" * (1 << 20))  # a real ENOSPC from the kernel
    msg = str(e.value)
    assert re.fullmatch(
        rf"cannot write a checkpoint to {re.escape(str(target))}: no space left on device on the filesystem at "
        rf"{re.escape(str(small_disk))} \([\d.]+ (B|KB) free of 256\.0 KB\); free space, then rerun with --resume auto",
        msg,
    ), msg
    import torch

    with pytest.raises(DiskFullError) as e:  # torch.save reports it as a RuntimeError of its C++ writer
        with disk_errors(target, "a checkpoint", "then"):
            torch.save(torch.zeros(1 << 18), target / "t.pt")
    assert str(e.value).startswith(f"cannot write a checkpoint to {target}: no space left on the filesystem at ")
    with pytest.raises(OSError) as e2, disk_errors(target, "x", "y"):  # anything else is not ours to reword
        raise OSError(errno.EACCES, "Permission denied")
    assert e2.value.errno == errno.EACCES


def test_unknown_flag_is_one_line_with_did_you_mean(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(train_args(corpus, tiny_tokenizer_dir, tmp_path / "r", "--max-stpes", "3"))
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "asvr-train: error: unrecognized arguments: --max-stpes 3 (--max-stpes: did you mean --max-steps?); "
        "asvr-train --help lists the options\n"
    )


def test_ctrl_c_line_names_the_checkpoint_or_says_there_is_none(tmp_path):
    from asvr.train.cli import interrupted_message

    run = tmp_path / "run"
    run.mkdir()
    assert interrupted_message(str(run)) == (
        f"interrupted before the first checkpoint: nothing to resume in {run}; rerun the same command to start again"
    )
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # steps ran, none saved: the folder now holds a run
    assert interrupted_message(str(run)) == (
        f"interrupted before the first checkpoint: nothing to resume in {run}; rerun the same command "
        "with --overwrite to start again"
    )
    _tag(run / "checkpoints", 3, complete=False, states=False)
    assert interrupted_message(str(run)).startswith("interrupted before the first checkpoint")  # cut short
    _tag(run / "checkpoints", 2)
    assert interrupted_message(str(run)) == (
        f"interrupted; to continue from step00000002 in {run}, rerun the same command with --resume auto"
    )


def test_every_cli_answers_a_typo_in_one_line(capsys):
    """The shared parser (asvr.core.cli_parser): a subcommand's flags are suggested too."""
    from asvr.pipeline.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["tokenize", "in", "--tokenizer", "t", "--out", "o", "--overwirte"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "asvr-pipeline: error: unrecognized arguments: --overwirte (--overwirte: did you mean --overwrite?); "
        "asvr-pipeline --help lists the options\n"
    )


def test_a_checkpoint_save_on_a_full_disk_is_one_line(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    """A real run whose --output-dir is a 512 KB tmpfs: DeepSpeed's save runs out of space."""
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "512k")
    try:
        out = mnt / "run"
        assert main(train_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "1", "--no-export")) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(
            rf"asvr-train: error: cannot write a checkpoint to {re.escape(str(out / 'checkpoints'))}: no space left "
            rf"(on device )?on the filesystem at {re.escape(str(mnt))} \([\d.]+ (B|KB) free of 512\.0 KB\); "
            r"free space, then rerun with --resume auto\n",
            err,
        ), err
        assert checkpoint.complete_tags(out / "checkpoints") == []  # the cut-short tag is not taken for one
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
