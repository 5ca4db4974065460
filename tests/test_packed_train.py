"""``asvr-train --packed``: losses equal the in-memory path's on the same plan, resume is bitwise,
a run saved on 2 gloo ranks resumes on 1 (and one saved on 1 resumes on 2) with every sample of
the epoch trained exactly once (DeepSpeed's universal checkpoint under the trainer), and the
in-memory path refuses another world size in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from asvr.pipeline.cli import main as pipeline_main
from asvr.train.cli import main
from train_corpus import TINY_HEAD, make_corpus, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer, n_images=24, n_captioned=20)


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    """One unit (the whole corpus) so its rows are the in-memory path's epoch-0 rows."""
    out = tmp_path_factory.mktemp("packed") / "p"
    args = ["pack", "--codes", str(corpus.codes), "--data", str(corpus.sft), "--model", str(corpus.llm),
            "--out", str(out), "--max-len", "256", "--template", "vicuna_v1", "--caption-free-ratio", "0.1",
            "--seed", "4", "--num-cpus", "1", "--no-progress"]  # fmt: skip
    assert pipeline_main(args) == 0
    return out


def packed_args(corpus, tok_dir, packed, out, *extra):
    return ["--model", str(corpus.llm), "--tokenizer", str(tok_dir), "--packed", str(packed),
            "--output-dir", str(out), "--max-len", "256", "--template", "vicuna_v1", "--seed", "4",
            *TINY_HEAD, "--quiet", "--no-export", *extra]  # fmt: skip


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_packed_losses_equal_the_in_memory_path_on_the_same_plan(corpus, tiny_tokenizer_dir, packed, tmp_path):
    common = ["--max-steps", "5", "--template", "vicuna_v1", "--seed", "4", "--caption-free-ratio", "0.1"]
    mem = tmp_path / "mem"
    assert main(train_args(corpus, tiny_tokenizer_dir, mem, *common, "--no-export", data=corpus.sft)) == 0
    run = tmp_path / "packed"
    assert main(packed_args(corpus, tiny_tokenizer_dir, packed, run, "--max-steps", "5", "--shuffle-buffer", "0")) == 0
    assert losses(run) == losses(mem)


def test_stop_and_resume_auto_is_bitwise(corpus, tiny_tokenizer_dir, packed, tmp_path):
    common = ["--max-steps", "4", "--micro-batch-size", "2"]
    whole = tmp_path / "whole"
    assert main(packed_args(corpus, tiny_tokenizer_dir, packed, whole, *common)) == 0
    part = tmp_path / "part"
    assert main(packed_args(corpus, tiny_tokenizer_dir, packed, part, *common, "--stop-after", "2")) == 0
    assert main(packed_args(corpus, tiny_tokenizer_dir, packed, part, *common, "--resume", "auto")) == 0
    assert losses(part) == losses(whole)


def test_refusals_are_one_line(corpus, tiny_tokenizer_dir, packed, tmp_path, capsys):
    args = packed_args(corpus, tiny_tokenizer_dir, packed, tmp_path / "r", "--max-steps", "1")
    args[args.index("--max-len") + 1] = "512"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "packed-00000.parquet" in err and "max_len" in err and "\n" not in err
    args = packed_args(
        corpus, tiny_tokenizer_dir, packed, tmp_path / "r2", "--max-steps", "1", "--codes", str(corpus.codes)
    )
    assert main(args) == 2
    assert "--packed replaces --codes" in capsys.readouterr().err


def _torchrun(args, env_extra, n=2):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "asvr.train.cli", *args]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]


def _logged(folder) -> list[dict]:
    return [json.loads(x) for f in sorted(folder.glob("rank*.jsonl")) for x in f.read_text().splitlines()]


def _every(packed) -> Counter:
    return Counter(
        s for f in packed.glob("packed-*.parquet") for r in pq.read_table(f).column("sample_ids").to_pylist() for s in r
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_ranks_one_epoch_then_resume_on_one_rank_trains_every_sample_once(
    corpus, tiny_tokenizer_dir, packed, tmp_path
):
    n_rows = json.loads((packed / "manifest.json").read_text())["counts"]["rows"]
    run, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    steps = n_rows // 2
    # 2 ranks: the first 3 steps, saved; then 1 rank: the rest of the epoch
    _torchrun(
        packed_args(corpus, tiny_tokenizer_dir, packed, run, "--max-steps", str(steps), "--stop-after", "3"),
        {"ASVR_SAMPLE_LOG": str(log)},
    )
    first = _logged(log)
    assert {r["epoch"] for r in first} == {0} and len(first) == 6
    rest = n_rows - 6
    os.environ["ASVR_SAMPLE_LOG"] = str(log)
    try:
        assert (
            main(packed_args(corpus, tiny_tokenizer_dir, packed, run, "--max-steps", str(3 + rest), "--resume", "auto"))
            == 0
        )
    finally:
        del os.environ["ASVR_SAMPLE_LOG"]
    trained = Counter(s for r in _logged(log) if r["epoch"] == 0 for s in r["samples"])
    assert trained == _every(packed)  # the whole epoch, each sample once, over 2 then 1 ranks


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_one_rank_then_resume_on_two_ranks_trains_every_sample_once(
    corpus, tiny_tokenizer_dir, packed, tmp_path, monkeypatch
):
    n_rows = json.loads((packed / "manifest.json").read_text())["counts"]["rows"]
    run, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("ASVR_SAMPLE_LOG", str(log))
    # 1 rank: the first 3 steps (3 rows), saved; then 2 ranks: the rest of the epoch
    assert main(packed_args(corpus, tiny_tokenizer_dir, packed, run, "--max-steps", "3")) == 0
    assert len(_logged(log)) == 3
    monkeypatch.delenv("ASVR_SAMPLE_LOG")
    steps = 3 + -(-(n_rows - 3) // 2)  # the last 2-rank step may reach into epoch 1
    _torchrun(
        packed_args(corpus, tiny_tokenizer_dir, packed, run, "--max-steps", str(steps), "--resume", "auto"),
        {"ASVR_SAMPLE_LOG": str(log)},
    )
    assert (run / "checkpoints" / "universal" / "step00000003" / "zero").is_dir()  # DeepSpeed's universal form
    trained = Counter(s for r in _logged(log) if r["epoch"] == 0 for s in r["samples"])
    assert trained == _every(packed)  # the whole epoch, each sample once, over 1 then 2 ranks


def test_in_memory_resume_on_another_world_size_is_refused_in_one_line(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    """The in-memory loader's plan is per world size: only --packed resumes elastically.  (The
    saved world is edited in the tag's completion marker: a 2-rank save, without 2 ranks.)"""
    run = tmp_path / "mem"
    args = train_args(corpus, tiny_tokenizer_dir, run, "--max-steps", "2", "--stop-after", "1", "--no-export")
    assert main(args) == 0
    marker = run / "checkpoints" / "step00000001" / "complete.json"
    marker.write_text(json.dumps({"step": 1, "world": 2}) + "\n")
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert "saved on 2 ranks" in err and "--packed" in err and "\n" not in err


@pytest.mark.parametrize("vision_input", ["online", "features"])
def test_online_and_features_inputs_from_packed_rows_equal_the_in_memory_path(
    corpus, tiny_tokenizer_dir, packed, tmp_path, vision_input
):
    """The image keys travel with the packed rows: the online input reads ``--images/KEY`` for
    each, the features input runs the tower on them; the losses are the in-memory path's (which
    reads the same images, features through its cache) on the same plan."""
    mode = ["--vision-input", vision_input, "--images", str(corpus.images)]
    common = ["--max-steps", "2", "--template", "vicuna_v1", "--seed", "4", "--caption-free-ratio", "0.1", *mode]
    mem = tmp_path / "mem"
    assert main(train_args(corpus, tiny_tokenizer_dir, mem, *common, "--no-export", data=corpus.sft)) == 0
    run = tmp_path / "packed"
    args = packed_args(corpus, tiny_tokenizer_dir, packed, run, "--max-steps", "2", "--shuffle-buffer", "0", *mode)
    assert main(args) == 0
    got, want = losses(run), losses(mem)
    if vision_input == "online":
        assert got == want  # the same pixels, the same batches
    else:  # features per key here, in batches into the in-memory path's cache
        assert got == pytest.approx(want, rel=1e-5)
    assert all(v > 0 for v in got)
