"""``train/loop/checkpoint.py`` where a one-line bug hides from a one-process run (issue 24):

* multi-rank resume: two gloo ranks (CPU, spawned processes) with their own RNG streams
  save one checkpoint; a fresh engine in each rank, its RNG scrambled, loads it, and
  each rank must draw exactly what *it* drew after the save (a rank reading rank 0's
  file, or every rank writing one file, gives rank 1 rank 0's stream);
* a tag folder holding only optimizer states (a ZeRO save cut before the model states)
  is refused with the list of complete checkpoints, like an empty one.

The reference is the run that never stopped (its own draws), compared exactly."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from asvr.train.loop.trainer import free_port


def _draws() -> list:
    return [random.random(), random.gauss(0, 1), float(np.random.standard_normal()), torch.rand(3).tolist()]


def _rank_worker(rank: int, world: int, port: int, run: str) -> None:
    """One rank: seed its own streams, train a step, save, draw; then a fresh engine with a
    scrambled RNG loads the save and draws again.  Writes ``rank<r>.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pathlib import Path

    import torch.distributed as dist

    from asvr.train.loop import checkpoint

    from asvr.train import libraries

    libraries.configure()
    import deepspeed

    dist.init_process_group("gloo", rank=rank, world_size=world)

    def make():
        torch.manual_seed(0)  # the same initial weights on every rank
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
        with libraries.quiet_stdout(False):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
        return engine

    engine = make()
    random.seed(10 + rank), np.random.seed(20 + rank), torch.manual_seed(30 + rank)
    random.gauss(0, 1), np.random.standard_normal()  # both cache a second normal value
    x = torch.rand(1, 4)  # a rank's own batch: its own stream
    engine.backward(engine(x).square().sum())
    engine.step()
    checkpoint.save(engine, Path(run), 1, {"epoch": 0, "position": 1}, rank, 0)
    want = _draws()
    weights = [p.detach().clone() for p in engine.module.parameters()]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a new process would start elsewhere
    resumed = make()
    client = checkpoint.load(resumed, Path(run), rank)
    got = _draws()
    same_weights = all(torch.equal(a, b) for a, b in zip(weights, resumed.module.parameters()))
    out = {"want": want, "got": got, "step": client["step"], "same_weights": same_weights}
    (Path(run) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(900)
def test_two_ranks_resume_their_own_rng_streams(tmp_path):
    import torch.multiprocessing as mp

    run = tmp_path / "run"
    run.mkdir()
    mp.start_processes(_rank_worker, args=(2, free_port(), str(run)), nprocs=2, join=True, start_method="spawn")
    tag = run / "checkpoints" / "step00000001"
    assert sorted(p.name for p in tag.glob("rng-*")) == ["rng-rank0.pt", "rng-rank1.pt"]
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["want"] != r1["want"]  # the ranks' streams differ, so a mix-up shows
    for r in (r0, r1):
        assert r["got"] == r["want"] and r["step"] == 1 and r["same_weights"]


# --------------------------------------------------------------------------- a tag folder with optimizer states only
OPTIM_ONLY = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_tag_folder_with_only_optimizer_states_is_refused(tmp_path):
    from asvr.train.loop import checkpoint
    from asvr.train.loop.checkpoint import CheckpointError

    ckpt = tmp_path / "checkpoints"
    for tag, files in (
        ("step00000001", ["mp_rank_00_model_states.pt", "rng-rank0.pt"]),  # ZeRO-0/1/2: complete
        ("step00000002", ["zero_pp_rank_0_mp_rank_00_model_states.pt", *OPTIM_ONLY]),  # ZeRO-3: complete
        ("step00000003", [*OPTIM_ONLY, "rng-rank0.pt", "rng-rank1.pt"]),  # cut before the model states
    ):
        (ckpt / tag).mkdir(parents=True)
        for f in files:
            torch.save({}, ckpt / tag / f)
    (ckpt / "latest").write_text("step00000003")
    assert [checkpoint._has_model_states(ckpt / t) for t in ("step00000001", "step00000002", "step00000003")] == [
        True,
        True,
        False,
    ]
    # --resume auto passes over the cut-short tag that ``latest`` names (issue 23): the newest complete one
    tag, why = checkpoint.resume_choice(tmp_path)
    # (step00000002 has no marker and no RNG file: a pre-marker tag counts only with both)
    assert tag == "step00000001"
    assert why == (
        f"--resume auto: {ckpt / 'latest'} names step00000003, which is incomplete (a save cut short); "
        "resuming from step00000001, the newest complete checkpoint"
    )
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(None, tmp_path, 1, "step00000003")
    assert str(e.value) == (
        f"--resume step00000003: {ckpt / 'step00000003'} is incomplete (no DeepSpeed model states: a save cut "
        "short); complete checkpoints: step00000001"
    )
