"""Micro-batches: :class:`Collator` turns a micro-batch plan (rows of sample indices, see
``packing.py``) into a :class:`~asvr.train.data.batch.Batch`; :class:`PackedLoader` iterates plans
epoch after epoch and carries ``(epoch, position)`` so a run resumes mid-epoch on exactly the next
micro-batch.  Split from ``dataset.py`` (the join and its checks) along the torchtitan seam
dataset / collator / loader (issue 21: files under 400 lines).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from asvr.train.data.batch import Batch, blank_rows, rows_to_batch
from asvr.train.data.packing import MicroBatch, PackingConfig, plan_epoch, shard_for_rank
from asvr.train.data.sources import DataError

if TYPE_CHECKING:
    from asvr.train.data.dataset import TrainingData


class Collator:
    """Micro-batch plan -> :class:`Batch` (picklable: runs in DataLoader workers).

    ``source(key)`` is what the vision input yields for one image
    (``VisionInputMode.source``: codes, pixels or features); the visual targets
    always come from the shards."""

    def __init__(
        self, data: TrainingData, source: Callable[[str], np.ndarray], pad_id: int, grey_codes: np.ndarray | None = None
    ):
        self.samples = data.samples
        self.store = data.store
        self.source = source
        self.pad_id = pad_id
        self.grey_codes = grey_codes  # [H*W, D]: --text-only-visual-loss grey-image

    def __call__(self, mb: MicroBatch) -> Batch:
        width = max(sum(len(self.samples[i].encoded) for i in row) for row in mb)
        b = len(mb)
        ids, labels, pos, sid, img = blank_rows(b, width, self.pad_id)
        keys: list[str] = []
        n_text_only = 0
        for r, row in enumerate(mb):
            t = 0
            for n, i in enumerate(row, start=1):
                s = self.samples[i]
                e = s.encoded
                L = len(e)
                ids[r, t : t + L] = e.input_ids
                labels[r, t : t + L] = e.labels
                pos[r, t : t + L] = np.arange(L)
                sid[r, t : t + L] = n
                img[r, t : t + L] = e.image_mask
                if s.key is not None:  # set exactly when the sample has image positions
                    keys.append(s.key)
                else:
                    n_text_only += 1
                t += L
        vision = codes = None
        if keys:
            vision = torch.from_numpy(np.stack([self.source(k) for k in keys]))
            codes = torch.from_numpy(np.stack([self.store.get(k) for k in keys]).astype(np.int64))
        return rows_to_batch(
            ids, labels, pos, sid, img, vision=vision, codes=codes, grey_codes=self.grey_codes, n_text_only=n_text_only
        )


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, plan: list[MicroBatch], collate: Collator):
        self.plan = plan
        self.collate = collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        return self.collate(self.plan[i])


class PackedLoader:
    """Endless, deterministic, rank-sharded micro-batches with resumable ``(epoch, position)``."""

    def __init__(
        self,
        lengths: Sequence[int],
        collate: Collator,
        packing: PackingConfig,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ):
        self.lengths = list(lengths)
        self.collate = collate
        self.packing = packing
        self.seed = seed
        self.rank = rank
        self.world = world
        self.num_workers = num_workers
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already handed out on this rank
        if not self.rank_plan(0):
            raise DataError(f"{len(self.lengths)} samples make fewer micro-batches than the {world} ranks")

    def rank_plan(self, epoch: int) -> list[MicroBatch]:
        return shard_for_rank(plan_epoch(self.lengths, self.packing, self.seed, epoch), self.rank, self.world)

    def micro_batches_per_epoch(self) -> int:
        return len(self.rank_plan(0))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world", self.world) != self.world or state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"checkpoint loader state was for seed {state.get('seed')} x {state.get('world')} ranks; "
                f"this run has seed {self.seed} x {self.world} ranks"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            rest = self.rank_plan(self.epoch)[self.position :]
            if self.num_workers > 0:
                it: Iterable[Batch] = torch.utils.data.DataLoader(
                    _PlanDataset(rest, self.collate),
                    batch_size=None,
                    shuffle=False,
                    num_workers=self.num_workers,
                    persistent_workers=False,
                )
            else:
                it = (self.collate(mb) for mb in rest)
            for batch in it:
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0
