"""Checkpoint pieces the resume tests reached only through the trainer (issue 24, mutation
survivors of ``checkpoint``): what a tag's completion marker says (world size, ZeRO stage,
the fallbacks for tags without one), the seed of a rank new to an elastic resume, and
DeepSpeed's universal form made once, atomically, holding the engine's own fp32 weights.
References: hand-written markers, numpy's SeedSequence written out, the engine's parameters.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from asvr.train import libraries
from asvr.train.loop import checkpoint
from asvr.train.loop.checkpoint import COMPLETE, saved_world, saved_zero, seed_everything, tag_for


def _tag(run, step=3, marker=None, optim_files=0):
    folder = run / "checkpoints" / tag_for(step)
    folder.mkdir(parents=True)
    if marker is not None:
        (folder / COMPLETE).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    for r in range(optim_files):
        (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return tag_for(step)


def test_saved_world_reads_the_marker_else_counts_optimizer_partitions(tmp_path):
    assert saved_world(tmp_path, None) is None and saved_world(tmp_path, tag_for(1)) is None  # no such tag
    assert saved_world(tmp_path / "a", _tag(tmp_path / "a", marker={"world": 4, "zero": 2}, optim_files=2)) == 4
    assert saved_world(tmp_path / "b", _tag(tmp_path / "b", marker={"step": 3}, optim_files=3)) == 3
    assert saved_world(tmp_path / "c", _tag(tmp_path / "c", marker="not json", optim_files=2)) == 2
    assert saved_world(tmp_path / "d", _tag(tmp_path / "d", marker={"world": "x"}, optim_files=1)) == 1
    assert saved_world(tmp_path / "e", _tag(tmp_path / "e", marker=["world"], optim_files=5)) == 5  # not a dict
    assert saved_world(tmp_path / "f", _tag(tmp_path / "f")) is None  # no marker, no partitions: unknown


def test_saved_zero_reads_the_marker_and_old_tags_were_stage_2(tmp_path):
    assert saved_zero(tmp_path, None) is None and saved_zero(tmp_path, tag_for(1)) is None
    assert saved_zero(tmp_path / "a", _tag(tmp_path / "a", marker={"world": 1, "zero": 3})) == 3
    assert saved_zero(tmp_path / "b", _tag(tmp_path / "b", marker={"world": 1, "zero": 0})) == 0
    assert saved_zero(tmp_path / "c", _tag(tmp_path / "c", marker={"world": 1})) == 2
    assert saved_zero(tmp_path / "d", _tag(tmp_path / "d")) == 2


def _draws():
    return random.random(), float(np.random.random_sample()), torch.rand(2).tolist()


def test_seed_everything_seeds_every_rng_from_seed_rank_and_step():
    s = int(np.random.SeedSequence([11, 2, 30]).generate_state(1)[0])
    random.seed(s), np.random.seed(s), torch.manual_seed(s)
    want = _draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    seed_everything(11, 2, 30)
    assert _draws() == want
    others = set()
    for args in ((11, 3, 30), (11, 2, 31), (12, 2, 30)):
        seed_everything(*args)
        others.add(tuple(_draws()[:2]))
    assert len(others) == 3 and tuple(want[:2]) not in others


def _step(engine, x):
    engine.backward(engine(x).square().sum())
    engine.step()


@pytest.fixture(scope="module")
def zero2_engine():
    libraries.configure()
    import deepspeed

    from asvr.train.loop.trainer import init_distributed

    init_distributed()

    def make(universal: bool = False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "checkpoint": {"load_universal": universal},
        }
        with libraries.quiet_stdout(False):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
        return engine

    return make


def test_to_universal_holds_the_engines_weights_made_once_and_atomically(tmp_path, zero2_engine, capsys):
    engine = zero2_engine()
    x = torch.rand(1, 4)
    _step(engine, x)
    checkpoint.save(engine, tmp_path, 1, {}, 0, 0)
    tag = tag_for(1)
    stale = tmp_path / "checkpoints" / "universal" / (tag + ".tmp")
    stale.mkdir(parents=True)
    (stale / "half").write_text("a conversion cut short")
    capsys.readouterr()

    out = checkpoint.to_universal(tmp_path, tag)
    assert out == tmp_path / "checkpoints" / "universal" / tag and out.is_dir()
    assert not stale.exists() and not (out / "half").exists()  # a cut-short conversion is never reused
    assert "tmp" not in os.listdir(out)  # ds_to_universal's own temp folder removed
    said = capsys.readouterr()
    assert said.out == "" and said.err == ""  # ds_to_universal's prints and bars stay quiet unless verbose
    names = dict(engine.module.named_parameters())
    for name, p in names.items():
        fp32 = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)
        fp32 = fp32["param"] if isinstance(fp32, dict) else fp32
        assert torch.equal(fp32.reshape(p.shape), p.detach().float()), name
    assert sorted(p.name for p in (out / "zero").iterdir() if p.is_dir()) == sorted(names)

    (out / "marker-of-the-first-conversion").write_text("")
    assert checkpoint.to_universal(tmp_path, tag) == out  # made once: an existing copy is kept
    assert (out / "marker-of-the-first-conversion").exists()

    _step(engine, x)
    checkpoint.save(engine, tmp_path, 2, {}, 0, 0)
    capsys.readouterr()
    checkpoint.to_universal(tmp_path, tag_for(2), verbose=True)
    said = capsys.readouterr()
    assert said.out and said.err  # verbose: DeepSpeed's own lines and progress bars


def test_save_marks_the_tag_with_step_world_and_stage(tmp_path, zero2_engine):
    engine = zero2_engine()
    _step(engine, torch.rand(1, 4))
    folder = checkpoint.save(engine, tmp_path, 7, {"epoch": 0}, 0, 0)
    assert folder == tmp_path / "checkpoints" / tag_for(7)
    assert (folder / COMPLETE).read_text() == json.dumps({"step": 7, "world": 1, "zero": 2}) + "\n"
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag_for(7)


def test_a_universal_resume_of_a_rank_without_rng_file_seeds_it_from_seed_rank_step(tmp_path, zero2_engine):
    engine = zero2_engine()
    x = torch.rand(1, 4)
    for step in (1, 2):
        _step(engine, x)
        checkpoint.save(engine, tmp_path, step, {}, 0, 0)
    want = [p.detach().clone() for p in engine.module.parameters()]
    checkpoint.to_universal(tmp_path, tag_for(2))
    (tmp_path / "checkpoints" / tag_for(2) / "rng-rank0.pt").unlink()  # a rank the saved world lacked
    seed_everything(5, 0, 2)
    draws = _draws()
    resumed = zero2_engine(universal=True)
    client = checkpoint.load(resumed, tmp_path, 0, universal=True, seed=5)
    assert client["step"] == 2 and _draws() == draws
    assert all(torch.equal(a, b) for a, b in zip(resumed.module.parameters(), want))  # from the universal copy


def test_resume_choice_ordinary_case_odd_latest_files_and_refusals(tmp_path, zero2_engine):
    engine = zero2_engine()
    _step(engine, torch.rand(1, 4))
    for step in (1, 2):
        checkpoint.save(engine, tmp_path, step, {}, 0, 0)
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.resume_choice(tmp_path) == (tag_for(2), "")  # the ordinary case says nothing
    why = "resuming from step00000002, the newest complete checkpoint"
    (ckpt / "latest").write_bytes(b"\xff\xfestep")  # not UTF-8: read, not a crash
    assert checkpoint.resume_choice(tmp_path) == (
        tag_for(2),
        f"--resume auto: {ckpt / 'latest'} names \ufffd\ufffdstep, which is not there; {why}",
    )
    (ckpt / "latest").write_text("../checkpoints/" + tag_for(1))  # a path, not a tag: never followed
    tag, said = checkpoint.resume_choice(tmp_path)
    assert tag == tag_for(2) and said.startswith(f"--resume auto: {ckpt / 'latest'} names ../checkpoints/")
    (ckpt / "latest").write_text("")
    assert (
        checkpoint.resume_choice(tmp_path)[1] == f"--resume auto: {ckpt / 'latest'} is empty (a save cut short); {why}"
    )
    # a tag with model states but no marker, newer than the marked ones: cut short
    (ckpt / tag_for(3)).mkdir()
    torch.save({}, ckpt / tag_for(3) / "mp_rank_00_model_states.pt")
    torch.save({}, ckpt / tag_for(3) / "rng-rank0.pt")
    assert not checkpoint.is_complete(ckpt / tag_for(3))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(zero2_engine(), tmp_path, 0, tag_for(3))
    assert str(e.value) == (
        f"--resume {tag_for(3)}: {ckpt / tag_for(3)} is incomplete (no completion marker: a save cut short); "
        "complete checkpoints: step00000001, step00000002"
    )
    other = tmp_path / "other" / "checkpoints"  # an empty tag, in a run where nothing is complete
    (other / tag_for(4)).mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(zero2_engine(), tmp_path / "other", 0, tag_for(4))
    assert str(e.value) == (
        f"--resume {tag_for(4)}: {other / tag_for(4)} is incomplete (no DeepSpeed model states: a save cut short); "
        "complete checkpoints: none"
    )
    for t in (1, 2):
        (ckpt / tag_for(t) / COMPLETE).unlink()  # marked tags gone: step 3 now reads as a pre-marker tag
    assert checkpoint.complete_tags(ckpt) == [tag_for(1), tag_for(2), tag_for(3)]


def test_a_state_saved_with_cuda_loads_on_a_machine_without_it():
    from asvr.train.loop.checkpoint import rng_state, set_rng_state

    if torch.cuda.is_available():
        pytest.skip("the CPU-only case")
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = rng_state()
    want = _draws()
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as saved by a GPU rank
    set_rng_state(state)  # the CUDA generator is skipped, the others restored
    assert _draws() == want
