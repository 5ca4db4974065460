"""``asvr-train --packed DIR``: stream packed shards (:mod:`asvr.core.packed`) per rank.

Library choice (evaluated for this issue; wheels downloaded and read, not adopted):

* mosaicml-streaming 0.13: its own shard formats (MDS/JSON/CSV, no Parquet), so a second
  writer beside the pipeline's atomic unit commits; pins numpy<2.2 and pulls boto3, GCS,
  Azure, OCI and paramiko; elastic determinism needs a fixed ``num_canonical_nodes`` and its
  shared-memory local cache on every node.
* litdata 0.2.76: its own chunk format (``optimize``), plus torchvision/boto3/obstore; its
  elastic resume rounds the samples to drop down to ``world * batch_size``
  (``_round_down_drop_first``), i.e. a resume may repeat up to that many samples: not
  "exactly once".
* torchdata's ``StatefulDataLoader``: a loader wrapper whose state is the sampler's and the
  workers'; with ``DistributedSampler`` a different world size re-partitions the epoch, so it
  gives no exactly-once resume over a changed world size by itself.
* Ray Data's streaming iterators need a Ray cluster joined by every training rank.

So this is a plain pyarrow row-group reader with a deterministic *global* row order:

* the order of epoch ``e`` is a function of ``(seed, e)`` and the shards' footers only: the row
  groups (64 rows each) are permuted, then the rows of each window of ``shuffle_buffer`` rows
  (whole row groups) are permuted: the shuffle buffer without a buffer's state;
* the epochs are concatenated into one endless *stream*; every rank steps in lockstep and one
  micro-batch step consumes ``world * rows`` stream rows: rank ``r`` takes rows
  ``[c + r*rows, c + (r+1)*rows)`` of the stream at position ``c``;
* the state is ``consumed`` (stream rows handed out so far on all ranks together), the same on
  every rank; resuming on ``W'`` ranks (or another micro-batch size) continues at ``consumed``,
  so over an epoch every row (and so every sample) is trained exactly once; a micro-batch may
  straddle two epochs;
* a rank decodes only the row groups its rows are in, kept in an LRU of
  ``2 * shuffle_buffer / 64 + 2`` groups (read-ahead bounded by the window, flat in corpus
  size), and at most 8 shards open (an open ParquetFile holds ~2 MB: one per shard touched was
  +0.24 GB per rank at 1M images, 1.58x the RSS at 10k; bounded: 1.00x); the index is one int per row group.  A row group is decoded whole, so with ``W`` ranks
  each group is decoded up to ``W`` times (a few MB, cheap next to a step).
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from asvr.core.packed import PackedError, PackedMeta, check_packed_meta, list_packed, open_packed, read_row_group

from asvr.train.data.batch import Batch, blank_rows, rows_to_batch

MANIFEST = "manifest.json"
SAMPLE_LOG = "ASVR_SAMPLE_LOG"
"""Env var: a folder where each rank appends the sample ids it trains (audits, tests)."""


@dataclass
class PackedCorpus:
    """The footers of a packed folder: files, row groups, metadata (checked against the run)."""

    folder: Path
    meta: PackedMeta
    files: list[Path]
    groups: list[tuple[int, int]]  # (file index, row group)
    group_rows: np.ndarray  # rows per group

    @property
    def n_rows(self) -> int:
        return int(self.group_rows.sum())

    @classmethod
    def open(cls, folder: str | os.PathLike, want: dict) -> "PackedCorpus":
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not mpath.is_file():
            raise PackedError(f"--packed {folder}: no {MANIFEST} (make it with asvr-pipeline pack)")
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as e:
            raise PackedError(f"{mpath}: unreadable ({e})") from None
        if not manifest.get("complete"):
            raise PackedError(f"--packed {folder}: the pack run is unfinished; rerun the same asvr-pipeline pack")
        files = list_packed(folder)
        meta = None
        groups: list[tuple[int, int]] = []
        rows: list[int] = []
        for fi, f in enumerate(files):
            m, pf = open_packed(f)
            check_packed_meta(str(f), m, want)
            if meta is not None and m != meta:
                raise PackedError(f"{f}: packed with other settings than {files[0]}")
            meta = m
            for g in range(pf.metadata.num_row_groups):
                groups.append((fi, g))
                rows.append(pf.metadata.row_group(g).num_rows)
        assert meta is not None
        return cls(folder, meta, files, groups, np.asarray(rows, np.int64))


class StreamOrder:
    """Stream position -> (row group, row in group): the seeded global order (module doc)."""

    def __init__(self, corpus: PackedCorpus, seed: int, shuffle_buffer: int, shuffle: bool = True):
        self.corpus = corpus
        self.seed = seed
        self.shuffle = shuffle
        self.window_groups = max(1, -(-shuffle_buffer // 64))
        self.n_rows = corpus.n_rows
        self._epoch: int | None = None
        self._window: tuple[int, int] | None = None

    def _plan(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        n = len(self.corpus.groups)
        rng = np.random.default_rng([self.seed, epoch])
        self.gperm = rng.permutation(n) if self.shuffle else np.arange(n)
        self.gstart = np.concatenate([[0], np.cumsum(self.corpus.group_rows[self.gperm])])
        self._epoch, self._window = epoch, None

    def locate(self, pos: int) -> tuple[int, int, int]:
        """-> (epoch, group id, row in group) of stream position ``pos``."""
        epoch, p = divmod(pos, self.n_rows)
        self._plan(epoch)
        k = self.window_groups
        w = bisect.bisect_right(self.gstart, p) - 1  # permuted group holding p (before the window shuffle)
        w0 = (w // k) * k
        lo, hi = int(self.gstart[w0]), int(self.gstart[min(w0 + k, len(self.gperm))])
        if self._window != (epoch, w0):
            n = hi - lo
            self.wperm = np.random.default_rng([self.seed, epoch, w0]).permutation(n) if self.shuffle else np.arange(n)
            self._window = (epoch, w0)
        q = lo + int(self.wperm[p - lo])
        j = bisect.bisect_right(self.gstart, q) - 1
        return epoch, int(self.gperm[j]), q - int(self.gstart[j])


class PackedRows:
    """Decoded row groups (an LRU of ``capacity`` groups) -> one packed row as numpy arrays."""

    def __init__(self, corpus: PackedCorpus, capacity: int):
        self.corpus = corpus
        self.capacity = capacity
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self._files: dict[int, Any] = {}  # shard -> open ParquetFile, least recent first
        self.open_files = 8

    def _group(self, gid: int) -> dict:
        hit = self.cache.get(gid)
        if hit is not None:
            self.cache.move_to_end(gid)
            return hit
        fi, g = self.corpus.groups[gid]
        path = self.corpus.files[fi]
        pf = self._files.pop(fi, None) or open_packed(path)[1]
        self._files[fi] = pf  # most recent last
        if len(self._files) > self.open_files:
            self._files.pop(next(iter(self._files)))  # an open footer holds ~2 MB: bounded, not one per shard
        table = read_row_group(path, pf, g)
        cols = {name: table.column(name).to_pylist() for name in ("sample_ids", "image_keys")}
        for name in ("input_ids", "labels", "sample_offsets", "image_offsets", "codes"):
            col = table.column(name).combine_chunks()
            cols[name] = (col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False))
        self.cache[gid] = cols
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return cols

    def row(self, gid: int, r: int) -> dict:
        cols = self._group(gid)
        out = {k: cols[k][r] for k in ("sample_ids", "image_keys")}
        for k in ("input_ids", "labels", "sample_offsets", "image_offsets", "codes"):
            off, vals = cols[k]
            out[k] = vals[off[r] : off[r + 1]]
        return out


class PackedCollator:
    """Packed rows -> :class:`Batch` (the same tensors as :class:`~asvr.train.data.dataset.Collator`)."""

    def __init__(
        self,
        meta: PackedMeta,
        pad_id: int,
        source: Callable[[str], np.ndarray] | None = None,
        grey_codes: np.ndarray | None = None,
    ):
        self.meta = meta
        self.pad_id = pad_id
        self.source = source  # online/features: key -> pixels/features; None: the row's codes
        self.grey_codes = grey_codes

    def __call__(self, rows: list[dict]) -> Batch:
        width = max(len(r["input_ids"]) for r in rows)
        b = len(rows)
        ids, labels, pos, sid, img = blank_rows(b, width, self.pad_id)
        keys: list[str] = []
        codes: list[np.ndarray] = []
        n_text_only = 0
        hw, d, t = self.meta.grid[0] * self.meta.grid[1], self.meta.depth, self.meta.image_tokens
        for i, r in enumerate(rows):
            L = len(r["input_ids"])
            ids[i, :L] = r["input_ids"]
            labels[i, :L] = r["labels"]
            off = r["sample_offsets"]
            lens = np.diff(off)
            sid[i, :L] = np.repeat(np.arange(1, len(lens) + 1), lens)
            pos[i, :L] = np.arange(L) - np.repeat(off[:-1], lens)
            for o in r["image_offsets"]:
                img[i, o : o + t] = True
            keys.extend(r["image_keys"])
            codes.append(r["codes"].reshape(-1, hw, d))
            n_text_only += len(lens) - len(r["image_keys"])
        vision = visual = None
        if keys:
            allc = np.concatenate(codes).astype(np.int64)
            visual = torch.from_numpy(allc)
            if self.source is None:
                vision = torch.from_numpy(allc.reshape(len(keys), *self.meta.grid, d))
            else:
                vision = torch.from_numpy(np.stack([self.source(k) for k in keys]))
        return rows_to_batch(
            ids, labels, pos, sid, img, vision=vision, codes=visual, grey_codes=self.grey_codes, n_text_only=n_text_only
        )


class PackedStreamLoader:
    """Endless rank-sharded micro-batches of packed rows with elastic, exact ``consumed`` state."""

    def __init__(
        self,
        corpus: PackedCorpus,
        collate: PackedCollator,
        *,
        rows: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 512,
        shuffle: bool = True,
    ):
        self.corpus = corpus
        self.collate = collate
        self.rows = rows
        self.seed = seed
        self.rank = rank
        self.world = world
        self.order = StreamOrder(corpus, seed, shuffle_buffer, shuffle)
        self.reader = PackedRows(corpus, capacity=2 * self.order.window_groups + 2)
        self.consumed = 0
        if corpus.n_rows < world * rows:
            raise PackedError(f"--packed {corpus.folder}: {corpus.n_rows} rows, fewer than {world} ranks x {rows}")
        log = os.environ.get(SAMPLE_LOG)
        self.log_path = Path(log) / f"rank{rank}.jsonl" if log else None

    # what the trainer's lines and metrics read
    @property
    def epoch(self) -> int:
        return self.consumed // self.corpus.n_rows

    @property
    def position(self) -> int:
        return self.consumed % self.corpus.n_rows

    def micro_batches_per_epoch(self) -> int:
        return self.corpus.n_rows // (self.world * self.rows)

    def state_dict(self) -> dict:
        return {"kind": "packed", "consumed": self.consumed, "seed": self.seed, "n_rows": self.corpus.n_rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "packed":
            raise PackedError("the checkpoint was trained from --codes/--data, not --packed: resume it the same way")
        if state["seed"] != self.seed or state["n_rows"] != self.corpus.n_rows:
            raise PackedError(
                f"checkpoint loader state was for seed {state['seed']} over {state['n_rows']} packed rows; "
                f"this run has seed {self.seed} over {self.corpus.n_rows} rows in {self.corpus.folder}"
            )
        self.consumed = int(state["consumed"])

    def rank_rows(self, consumed: int) -> list[tuple[int, int, int]]:
        """(epoch, group, row) of this rank's micro-batch at stream position ``consumed``."""
        start = consumed + self.rank * self.rows
        return [self.order.locate(p) for p in range(start, start + self.rows)]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            where = self.rank_rows(self.consumed)
            rows = [self.reader.row(g, r) for _, g, r in where]
            batch = self.collate(rows)
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    for (e, _, _), row in zip(where, rows):
                        f.write(json.dumps({"epoch": e, "samples": list(row["sample_ids"])}) + "\n")
            self.consumed += self.world * self.rows
            yield batch


def open_packed_loader(
    cfg, tokenizer, tower, llm_tokenizer, *, rank: int, world: int, grey_codes: np.ndarray | None = None
) -> PackedStreamLoader:
    """``--packed``: the folder checked against this run (tokenizer fingerprint/grid/depth, text
    tokenizer, template, max length, image positions; one line naming the file), and this rank's
    stream.  ``online``/``features`` read ``--images/KEY`` for each row's image keys (features
    without a cache: the tower runs on them as the batch is built)."""
    from asvr.train.data.packed_build import text_tokenizer_hash
    from asvr.train.model.vision_input import SourceContext, get_vision_input

    spec = tokenizer.spec
    want = {
        "fingerprint": spec.fingerprint,
        "grid": tuple(spec.grid),
        "depth": spec.depth,
        "text_tokenizer": text_tokenizer_hash(llm_tokenizer),
        "template": cfg.template,
        "max_len": cfg.max_len,
        "image_tokens": tower.tokens_per_image if tower is not None else spec.grid[0] * spec.grid[1],
    }
    corpus = PackedCorpus.open(cfg.packed, want)
    mode = get_vision_input(cfg.vision_input)
    source = None
    if mode.uses_tower:
        ctx = SourceContext(
            store=None,  # type: ignore[arg-type]  # online/features sources never read the store
            images=cfg.images,
            tower=tower,
            preprocess=corpus.meta.preprocess,
            cache=None,
            keys=[],
        )
        source = mode.source(ctx)
    collate = PackedCollator(corpus.meta, pad_id=llm_tokenizer.pad_token_id or 0, source=source, grey_codes=grey_codes)
    return PackedStreamLoader(
        corpus,
        collate,
        rows=cfg.micro_batch_size,
        seed=cfg.seed,
        rank=rank,
        world=world,
        shuffle_buffer=cfg.shuffle_buffer,
        shuffle=cfg.shuffle_buffer > 0,
    )
