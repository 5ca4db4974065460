"""asvr-train end to end on CPU with real DeepSpeed (gloo, fp32): exact resume,
sft from a pretrain run, ZeRO-3 vs ZeRO-2, two processes vs accumulation, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from asvr.train.cli import main
from asvr.train.loop.metrics import read_metrics
from conftest import build_tiny_tokenizer
from train_corpus import make_corpus, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


@pytest.fixture(scope="module")
def pretrain_run(corpus, tiny_tokenizer_dir, tmp_path_factory):
    """4 uninterrupted steps, 2 micro-batches each, checkpoint every 2."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert (
        main(
            train_args(
                corpus,
                tiny_tokenizer_dir,
                out,
                "--max-steps",
                "4",
                "--grad-accum",
                "2",
                "--save-every",
                "2",
                "--caption-free-ratio",
                "0.25",
                "--keep-checkpoints",
                "0",
            )
        )
        == 0
    )
    return out


def test_resume_reproduces_uninterrupted_losses_bitwise(corpus, tiny_tokenizer_dir, pretrain_run, tmp_path):
    out = tmp_path / "resumed"
    common = ["--max-steps", "4", "--grad-accum", "2", "--caption-free-ratio", "0.25"]
    assert main(train_args(corpus, tiny_tokenizer_dir, out, *common, "--stop-after", "2")) == 0
    assert not (out / "final").exists() and (out / "checkpoints" / "step00000002").is_dir()
    assert main(train_args(corpus, tiny_tokenizer_dir, out, *common, "--resume", "auto")) == 0
    straight, resumed = read_metrics(pretrain_run), read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "loss_text", "loss_visual", "loss_visual_d2", "lr"):
        assert [r[key] for r in straight] == [r[key] for r in resumed], key  # exact, not approx
    first = straight[0]
    assert {"loss_visual_d0", "loss_visual_d1", "tokens_per_s"} <= set(first)
    assert np.isclose(first["loss"], first["loss_text"] + first["loss_visual"], rtol=1e-6)
    assert np.isclose(first["loss_visual"], np.mean([first[f"loss_visual_d{d}"] for d in range(3)]), rtol=1e-6)
    assert straight[-1]["loss_visual"] < straight[0]["loss_visual"]
    from PIL import Image

    with Image.open(pretrain_run / "loss.png") as im:  # titled with the run and the stage, the flat text loss explained
        assert im.text["Title"] == f"run {pretrain_run.parent.name}/straight: pretrain stage"
        assert im.text["Description"].startswith("LLM frozen")
    assert sorted(p.name for p in (pretrain_run / "checkpoints").glob("step*")) == ["step00000002", "step00000004"]


def test_metrics_read_in_windows_equal_per_step_reads(corpus, tiny_tokenizer_dir, pretrain_run, tmp_path):
    """--log-every 3 reads the device once per 3 steps (and at the end): same rows, same
    values as the run above; --no-final-checkpoint leaves no checkpoint behind."""
    out = tmp_path / "windowed"
    assert (
        main(
            train_args(
                corpus,
                tiny_tokenizer_dir,
                out,
                "--max-steps",
                "4",
                "--grad-accum",
                "2",
                "--caption-free-ratio",
                "0.25",
                "--log-every",
                "3",
                "--no-final-checkpoint",
                "--no-export",
            )
        )
        == 0
    )
    straight, windowed = read_metrics(pretrain_run), read_metrics(out)
    assert [r["step"] for r in windowed] == [1, 2, 3, 4]
    for key in ("loss", "loss_text", "loss_visual", "loss_visual_d1", "lr", "epoch"):
        assert [r[key] for r in straight] == [r[key] for r in windowed], key
    assert all(r["tokens_per_s"] > 0 and r["step_time_s"] > 0 for r in windowed)
    assert not list((out / "checkpoints").glob("step*")) if (out / "checkpoints").exists() else True


def corpus_mode(corpus) -> str:
    from asvr.core.shards import read_meta

    return read_meta(next(corpus.codes.glob("part-*.parquet"))).preprocess


def test_config_file_of_a_run_reproduces_it(pretrain_run, tmp_path):
    saved = json.loads((pretrain_run / "train_config.json").read_text())
    assert saved["max_steps"] == 4 and saved["head"]["width"] == 64 and saved["template"] == "plain"
    out = tmp_path / "again"
    assert main(["--config", str(pretrain_run / "train_config.json"), "--output-dir", str(out)]) == 0
    assert json.loads((out / "train_config.json").read_text()) == {**saved, "output_dir": str(out)}
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(pretrain_run)]


def test_pretrain_freezes_llm_and_exports_loadable_model(corpus, pretrain_run, tiny_tokenizer):
    from asvr.train.export.native import load_exported

    final = load_file(str(pretrain_run / "final" / "model.safetensors"))
    llm0 = load_file(str(corpus.llm / "model.safetensors"))
    for k, v in llm0.items():
        assert torch.equal(final["llm." + k], v), k  # LLM frozen in pretraining
    model = load_exported(pretrain_run / "final", tokenizer=tiny_tokenizer)
    assert torch.equal(
        model.projector.state_dict()[next(iter(model.projector.state_dict()))],
        final["projector." + next(iter(model.projector.state_dict()))],
    )
    # the export records how the model read its inputs (issue 22): template, the shards' mode, image size
    from asvr.train.export.native import TrainedInputs, read_inputs

    enc = tiny_tokenizer.spec.encoder
    assert read_inputs(pretrain_run / "final") == TrainedInputs(
        template="plain", preprocess=corpus_mode(corpus), image_size=enc.image_size, resample=enc.resample
    )


def test_sft_starts_from_pretrain_weights(corpus, tiny_tokenizer_dir, pretrain_run, tmp_path):
    out = tmp_path / "sft"
    # lr 0: one real SFT step through DeepSpeed leaves the --init-from weights untouched
    assert (
        main(
            train_args(
                corpus,
                tiny_tokenizer_dir,
                out,
                "--stage",
                "sft",
                "--init-from",
                str(pretrain_run),
                "--max-steps",
                "1",
                "--lr",
                "0",
                data=corpus.sft,
            )
        )
        == 0
    )
    a = load_file(str(pretrain_run / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_metrics(out)[0]["loss_text"] > 0


def test_zero3_features_equals_zero2_online(corpus, tiny_tokenizer_dir, tmp_path):
    common = ["--stage", "sft", "--max-steps", "2", "--caption-free-ratio", "0.2", "--no-export"]
    assert (
        main(
            train_args(
                corpus, tiny_tokenizer_dir, tmp_path / "z2", *common, "--vision-input", "online", data=corpus.sft
            )
        )
        == 0
    )
    assert (
        main(
            train_args(
                corpus,
                tiny_tokenizer_dir,
                tmp_path / "z3",
                *common,
                "--vision-input",
                "features",
                "--zero",
                "3",
                "--gradient-checkpointing",
                data=corpus.sft,
            )
        )
        == 0
    )
    assert list((tmp_path / "z3" / "cache").glob("features-*.npy"))
    a, b = read_metrics(tmp_path / "z2"), read_metrics(tmp_path / "z3")
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)


@pytest.mark.timeout(1800)
def test_two_processes_equal_one_process_with_accumulation(corpus, tiny_tokenizer_dir, tmp_path):
    common = ["--stage", "sft", "--max-steps", "2", "--no-export", "--seed", "1"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "asvr.train.cli",
        *train_args(corpus, tiny_tokenizer_dir, tmp_path / "w2", *common, data=corpus.sft),
    ]
    # no wall-clock limit of its own beyond pytest's (below): on busy shared cores the two ranks
    # took past 300 s, waiting on the DeepSpeed op cache that other processes were rebuilding
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        main(train_args(corpus, tiny_tokenizer_dir, tmp_path / "w1", *common, "--grad-accum", "2", data=corpus.sft))
        == 0
    )
    a, b = read_metrics(tmp_path / "w2"), read_metrics(tmp_path / "w1")
    assert len(a) == 2
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)


def test_errors_are_one_line(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    other = build_tiny_tokenizer(tmp_path / "other_tok", seed=1)
    assert main(train_args(corpus, other, tmp_path / "r1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asvr-train: error:") and "\n" not in err and "tokenizer" in err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "image": "missing.jpg", "conversations": []}]')
    assert main(train_args(corpus, tiny_tokenizer_dir, tmp_path / "r2", data=bad)) == 2
    err = capsys.readouterr().err.strip()
    assert "1 bad samples" in err and "\n" not in err
    args = train_args(corpus, tiny_tokenizer_dir, tmp_path / "r3", "--vision-input", "online")
    args[args.index("--images") + 1] = str(tmp_path / "nope")
    assert main(args) == 2
    assert "no such folder" in capsys.readouterr().err


def test_existing_run_folder_is_refused_without_resume_or_overwrite(
    corpus, tiny_tokenizer_dir, pretrain_run, tmp_path, capsys
):
    import shutil

    run = tmp_path / "again"
    shutil.copytree(pretrain_run, run)
    before = (run / "metrics.jsonl").read_text()
    assert main(train_args(corpus, tiny_tokenizer_dir, run, "--max-steps", "1")) == 2
    assert capsys.readouterr().err.strip() == (
        f"asvr-train: error: {run} already holds a run: --resume auto to continue, --overwrite to start again"
    )
    assert (run / "metrics.jsonl").read_text() == before  # untouched
    assert main(train_args(corpus, tiny_tokenizer_dir, run, "--max-steps", "1", "--overwrite")) == 0
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000001"]


def test_a_run_prints_only_our_lines(corpus, tiny_tokenizer_dir, tmp_path):
    """A fresh process as a user's: no "Setting accelerator to CPU", no "Loading weights" bar,
    no "... built successfully"; our counts, our bar, our summary."""
    out = tmp_path / "plain"
    args = [a for a in train_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "1", "--no-export") if a != "--quiet"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    }
    r = subprocess.run(
        [sys.executable, "-m", "asvr.train.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if not line.startswith("building DeepSpeed's")]  # first run only
    assert lines[0].startswith("9 samples (9 conversations") and len(lines) == 2, r.stdout
    assert lines[1].startswith("done: step 1 loss")
    bar = [part for part in r.stderr.replace("\r", "\n").splitlines() if part.strip()]
    assert bar and all(part.startswith("pretrain: ") for part in bar), r.stderr[-3000:]


def test_online_without_images_is_one_line_error(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    args = train_args(corpus, tiny_tokenizer_dir, tmp_path / "r", "--vision-input", "online")
    i = args.index("--images")
    del args[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asvr-train: error: --vision-input online") and "--images" in err and "\n" not in err


@pytest.mark.timeout(1200)
def test_ctrl_c_is_one_line_naming_resume(corpus, tiny_tokenizer_dir, tmp_path):
    """A real SIGINT (what Ctrl-C sends) during a run: exit 130, one line that says what is true
    (before the first checkpoint: nothing to resume; after one: --resume auto, test_preemption_23).
    In its own process, as a user runs it: run in this process after the rest of the suite, the
    run trained on through every SIGINT (cause not found; see the comment below)."""
    args = train_args(corpus, tiny_tokenizer_dir, tmp_path / "r", "--max-steps", "100000")
    # a terminal's process starts with SIGINT delivered and Python's handler; in the full suite the
    # child inherited SIGINT ignored or blocked from native code run earlier in this process
    code = (
        "import signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from asvr.train.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by this session's runs
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env)
    err = ""
    try:
        # SIGINT only once the run is training (train_config.json is written just before the loop):
        # a SIGINT during the imports or argument parsing is Python's own KeyboardInterrupt, before
        # run_guarded (seen on busy cores with the fixed 8 s wait this replaced)
        ready = tmp_path / "r" / "train_config.json"
        deadline = time.monotonic() + 600
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"the run never started training (exit {proc.poll()})"
        for _ in range(12):  # pressed again if missed (a SIGINT inside native code can be lost)
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    out = tmp_path / "r"  # no checkpoint yet (the first is due after --save-every-minutes 30): no resume promised
    again = "with --overwrite " if (out / "metrics.jsonl").exists() else ""
    assert lines[-1] == (
        f"interrupted before the first checkpoint: nothing to resume in {out}; rerun the same command {again}"
        "to start again"
    )
    assert not any("Traceback" in line for line in lines)
