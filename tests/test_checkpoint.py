"""``train/loop/checkpoint.py`` on a real DeepSpeed engine around a 4 -> 3 linear layer
(CPU, one process, gloo): save/load in milliseconds, so every path is checked
without a training run: tag names, pruning to ``--keep-checkpoints``, the
``latest`` file, loading the newest or a named tag (weights, optimizer and RNG
state, compared bitwise with the run that never stopped), the RNG file's
refusal of pickles, and ``--init-from``'s folder resolution.  The training-run
versions of these claims are in ``test_train_runs.py``."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from asvr.train.loop import checkpoint

from asvr.train import libraries
from asvr.core.errors import FingerprintError
from asvr.train.loop.checkpoint import CheckpointError, latest_tag, load_rng_state, rng_state, set_rng_state, tag_for


@pytest.fixture(scope="module")
def make_engine():
    libraries.configure()
    import deepspeed

    from asvr.train.loop.trainer import init_distributed

    init_distributed()

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
        with libraries.quiet_stdout(False):
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=opt, lr_scheduler=sched, config=config, dist_init_required=False
            )
        return engine

    return make


def _step(engine, seed):
    """One optimizer step on an input drawn from the global torch RNG (so the RNG state matters)."""
    x = torch.rand(1, 4) + seed
    engine.backward(engine(x).square().sum())
    engine.step()


def _weights(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def _draws():
    return random.random(), random.gauss(0, 1), float(np.random.standard_normal()), torch.rand(3).tolist()


def test_tag_names_sort_by_step():
    assert tag_for(42) == "step00000042"
    assert tag_for(123456789) == "step123456789"
    assert sorted([tag_for(10), tag_for(9)]) == [tag_for(9), tag_for(10)]


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both cache a second normal value
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_rng_state(tmp_path / "rng.pt"))
    assert _draws() == want


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_a_pickle_in_place_of_the_rng_file_is_refused_unrun(tmp_path, capsys):
    path = tmp_path / "rng-rank0.pt"
    path.write_bytes(pickle.dumps({"python": _Planted()}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        load_rng_state(path)
    assert str(e.value) == (
        f"{path}: not an RNG state file of this project, refused without running it "
        "(UnpicklingError); the run folder is trusted input, check who wrote it"
    )
    assert "planted" not in capsys.readouterr().out


def test_latest_tag_needs_the_file_and_its_folder(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert latest_tag(tmp_path) is None
    ckpt.mkdir()
    (ckpt / "latest").write_text("step00000005\n")
    assert latest_tag(tmp_path) is None  # names a folder that is gone
    (ckpt / "step00000005").write_text("")
    assert latest_tag(tmp_path) is None  # not a folder
    (ckpt / "step00000005").unlink()
    (ckpt / "step00000005").mkdir()
    assert latest_tag(tmp_path) is None  # a folder, but not a complete checkpoint
    (ckpt / "step00000005" / "complete.json").write_text("{}")
    assert latest_tag(tmp_path) == "step00000005"


@pytest.mark.parametrize("keep,kept", [(2, [2, 3]), (1, [3]), (0, [1, 2, 3])])
def test_save_keeps_the_newest_tags(tmp_path, make_engine, keep, kept):
    engine = make_engine()
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "step_notes.txt").write_text("not a checkpoint: neither counted nor removed")
    for s in (1, 2, 3):
        _step(engine, s)
        path = checkpoint.save(engine, tmp_path, s, {"epoch": 0, "position": s}, 0, keep)
        assert path == tmp_path / "checkpoints" / tag_for(s)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(["latest", "step_notes.txt"] + [tag_for(s) for s in kept])
    assert (ckpt / "latest").read_text().strip() == tag_for(3)
    assert all((ckpt / tag_for(s) / "rng-rank0.pt").is_file() for s in kept)


def test_only_rank_0_prunes_and_each_rank_has_its_rng_file(tmp_path, make_engine):
    engine = make_engine()
    for s in (1, 2):
        _step(engine, s)
        checkpoint.save(engine, tmp_path, s, {}, 1, 1)  # as rank 1 (of a world of one)
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert tags == [tag_for(1), tag_for(2)]
    assert [p.name for p in (tmp_path / "checkpoints" / tag_for(2)).glob("rng-*")] == ["rng-rank1.pt"]


def test_load_resumes_the_newest_or_a_named_tag_bitwise(tmp_path, make_engine):
    straight = make_engine()
    weights, draws = {}, {}
    for s in (1, 2, 3):
        _step(straight, s)
        checkpoint.save(straight, tmp_path, s, {"epoch": 1, "position": 10 * s}, 0, 0)
        weights[s], draws[s] = _weights(straight), _draws()
    _step(straight, 4)
    after_three = _weights(straight)

    resumed = make_engine()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    client = checkpoint.load(resumed, tmp_path, 0)
    assert (client["step"], client["loader"]) == (3, {"epoch": 1, "position": 30})
    assert all(torch.equal(a, b) for a, b in zip(_weights(resumed), weights[3]))
    assert _draws() == draws[3]  # every RNG continues where the save left it

    named = make_engine()
    client = checkpoint.load(named, tmp_path, 0, tag_for(2))
    assert client["step"] == 2 and all(torch.equal(a, b) for a, b in zip(_weights(named), weights[2]))
    _draws()  # the straight run drew these after saving step 2
    _step(named, 3)  # optimizer moments, LR schedule and RNG restored: step 3 again, bitwise
    assert all(torch.equal(a, b) for a, b in zip(_weights(named), weights[3]))
    _draws()
    _step(named, 4)
    assert all(torch.equal(a, b) for a, b in zip(_weights(named), after_three))


def test_load_without_checkpoints_or_rng_file(tmp_path, make_engine, capsys):
    engine = make_engine()
    assert checkpoint.load(engine, tmp_path, 0) is None
    _step(engine, 1)
    checkpoint.save(engine, tmp_path, 1, {}, 0, 0)
    (tmp_path / "checkpoints" / tag_for(1) / "rng-rank0.pt").unlink()
    fresh = make_engine()
    torch.manual_seed(5)
    want = torch.rand(2)
    torch.manual_seed(5)
    assert checkpoint.load(fresh, tmp_path, 0)["step"] == 1  # no RNG file: RNG untouched, and said so
    assert torch.equal(torch.rand(2), want)
    rng = tmp_path / "checkpoints" / tag_for(1) / "rng-rank0.pt"
    assert capsys.readouterr().err == (
        f"warning: {rng} is missing: the random number generators of rank 0 start from the seed, "
        "so dropout and sampling differ from an uninterrupted run\n"
    )
    (tmp_path / "checkpoints" / "step00000002").write_text("")  # not a checkpoint folder
    (tmp_path / "checkpoints" / "step00000000").mkdir()
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(make_engine(), tmp_path, 0, "step00000009")
    ckpt = tmp_path / "checkpoints"
    assert str(e.value) == f"--resume step00000009: no such checkpoint in {ckpt} (there: step00000000, step00000001)"
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(make_engine(), tmp_path / "other", 0, "step00000001")
    assert (
        str(e.value)
        == f"--resume step00000001: no such checkpoint in {tmp_path / 'other' / 'checkpoints'} (there: none)"
    )
    with pytest.raises(CheckpointError) as e:  # a folder without model states: a save that was cut short
        checkpoint.load(make_engine(), tmp_path, 0, "step00000000")
    assert str(e.value) == (
        f"--resume step00000000: {ckpt / 'step00000000'} is incomplete (no DeepSpeed model states: a save cut "
        "short); complete checkpoints: step00000001"
    )


def test_init_from_finds_the_export_in_a_run_folder(tmp_path):
    from asvr.train.loop.checkpoint import load_pretrained
    from asvr.train.export.native import ExportError, save_exported
    from test_train_model import tiny_model

    model = tiny_model("llama", mode="codes")
    save_exported(model, tmp_path / "run" / "final")
    fresh = tiny_model("llama", mode="codes", seed=1)
    assert load_pretrained(fresh, tmp_path / "run", "") == tmp_path / "run" / "final"
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_pretrained(fresh, tmp_path / "run" / "final", "") == tmp_path / "run" / "final"
    config = tmp_path / "run" / "final" / "asvr_config.json"
    meta = json.loads(config.read_text())
    for drop in ("vision", "model"):  # an export without a tokenizer fingerprint
        (meta["model"] if drop == "vision" else meta).pop(drop)
        config.write_text(json.dumps(meta))
        with pytest.raises(FingerprintError) as e:
            load_pretrained(fresh, tmp_path / "run", "f" * 64)
        assert str(e.value) == (
            f"fingerprint mismatch: --init-from {tmp_path / 'run' / 'final'} has (none), "
            "this run's tokenizer has ffffffffffff"
        )
    with pytest.raises(ExportError) as e:
        load_pretrained(fresh, tmp_path, "")
    assert str(e.value) == (
        f"--init-from {tmp_path}: no exported model there (no asvr_config.json; a finished pretrain run has RUN/final)"
    )
