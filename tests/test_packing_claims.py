"""Packing against an independent best-fit, the plan's exact layout rules, the
Batch helpers, and the checkpoint helpers that need no DeepSpeed engine."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from asvr.train.loop import checkpoint
from asvr.train.data.batch import Batch
from asvr.train.data.packing import PackingConfig, best_fit_rows, padding_waste, plan_epoch, shard_for_rank


def _reference_best_fit(order, lengths, max_len, window):
    """Quadratic best-fit decreasing: per window, longest first (ties in order), each
    sample into the open row with the least space that still fits it (ties: the older
    row), else a new row; a window's rows close when it ends."""
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        open_rows: list[int] = []
        for i in sorted(order[start : start + window], key=lambda i: -lengths[i]):
            space = {r: max_len - sum(lengths[j] for j in rows[r]) for r in open_rows}
            fits = [r for r in open_rows if space[r] >= lengths[i]]
            if fits:
                rows[min(fits, key=lambda r: (space[r], r))].append(i)
            else:
                rows.append([i])
                open_rows.append(len(rows) - 1)
    return rows


@pytest.mark.parametrize("seed,window", [(0, 7), (1, 64), (2, 1000)])
def test_best_fit_equals_a_quadratic_reference(seed, window):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, 200).tolist()
    order = rng.permutation(200).tolist()
    got = best_fit_rows(order, lengths, 100, window)
    assert got == _reference_best_fit(order, lengths, 100, window)
    # rows never mix windows
    where = {i: p // window for p, i in enumerate(order)}
    assert all(len({where[i] for i in row}) == 1 for row in got)


def test_best_fit_refuses_an_overlong_sample():
    with pytest.raises(ValueError, match="101 tokens > max_len 100"):
        best_fit_rows([0, 1], [5, 101], 100, 8)
    assert best_fit_rows([0, 1], [100, 100], 100, 8) == [[0], [1]]  # exactly max_len fits


def test_micro_batches_pair_rows_of_neighbouring_fill():
    """One group (<= 16 micro-batches): rows sorted by fill, cut into micro-batches.
    Samples of 9..15 tokens in rows of 16: one sample a row, fills all different."""
    lengths = list(range(9, 16)) * 3
    plan = plan_epoch(lengths, PackingConfig(max_len=16, rows=2), seed=0, epoch=0)
    fill = lambda row: sum(lengths[i] for i in row)  # noqa: E731
    fills = sorted((fill(r) for mb in plan for r in mb), reverse=True)
    assert len(fills) <= 32
    want = sorted(tuple(fills[k : k + 2]) for k in range(0, len(fills), 2))
    assert sorted(tuple(sorted((fill(r) for r in mb), reverse=True)) for mb in plan) == want


def test_packing_config_validation():
    for kw in ({"max_len": 0}, {"rows": 0}, {"window": 0}):
        with pytest.raises(ValueError, match="max_len, rows and window must be >= 1"):
            PackingConfig(**kw)
    PackingConfig(max_len=1, rows=1, window=1)


def test_plan_layouts():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10] * 3
    one = plan_epoch(lengths, PackingConfig(max_len=16, rows=1), seed=0, epoch=0)
    assert all(len(mb) == 1 for mb in one)
    unpacked = plan_epoch(lengths, PackingConfig(max_len=16, rows=4, pack=False), seed=0, epoch=0)
    assert [len(mb) for mb in unpacked] == [4] * 7 + [2]
    assert all(len(row) == 1 for mb in unpacked for row in mb)
    packed = plan_epoch(lengths, PackingConfig(max_len=16, rows=2), seed=0, epoch=0)
    assert sorted(i for mb in packed for row in mb for i in row) == list(range(30))
    assert all(len(mb) <= 2 for mb in packed) and sum(len(mb) == 1 for mb in packed) <= 1


def test_shard_for_rank_and_padding_waste_by_hand():
    plan = [[[i]] for i in range(10)]
    assert shard_for_rank(plan, 0, 3) == [[[0]], [[3]], [[6]]]
    assert shard_for_rank(plan, 2, 3) == [[[2]], [[5]], [[8]]]
    assert shard_for_rank(plan, 0, 1) == plan
    assert padding_waste([[[0], [1]]], [3, 5]) == pytest.approx(0.2)
    assert padding_waste([[[0, 1]], [[2]]], [3, 5, 8]) == 0.0
    assert padding_waste([], []) == 0.0


def test_batch_helpers():
    ids = torch.tensor([[1, 2, 3, 0]])
    sid = torch.tensor([[1, 1, 2, 0]])
    mask = torch.tensor([[False, True, False, False]])
    b = Batch(ids, ids.clone(), torch.tensor([[0, 1, 0, 0]]), sid, mask)
    assert b.num_tokens == 3 and b.num_images == 0
    b.visual_codes = torch.zeros(2, 1, 3, dtype=torch.long)
    assert b.num_images == 2
    b.vision = torch.zeros(5, 1, 1, 3)
    assert b.num_images == 5
    c = b.to("cpu")
    assert c is not b and all(
        torch.equal(getattr(b, f), getattr(c, f)) for f in ("input_ids", "vision", "visual_codes")
    )
    assert c.visual_loss_mask is None
    m = b.to("meta")
    assert {getattr(m, f).device.type for f in ("input_ids", "labels", "sample_ids", "vision")} == {"meta"}


def test_rng_state_roundtrip():
    state = checkpoint.rng_state()
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(3)  # move on
    checkpoint.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_tag_and_latest_tag(tmp_path):
    assert checkpoint.tag_for(42) == "step00000042"
    assert checkpoint.latest_tag(tmp_path) is None
    ck = tmp_path / checkpoint.CHECKPOINTS
    ck.mkdir()
    (ck / "latest").write_text("step00000002\n")
    assert checkpoint.latest_tag(tmp_path) is None  # names a tag that is not there
    (ck / "step00000002").mkdir()
    assert checkpoint.latest_tag(tmp_path) is None  # there, but no rank finished saving it (issue 23)
    (ck / "step00000002" / checkpoint.COMPLETE).write_text('{"step": 2, "world": 1}\n')
    assert checkpoint.latest_tag(tmp_path) == "step00000002"
