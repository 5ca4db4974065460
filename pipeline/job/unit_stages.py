"""The Ray Data stages of a tokenize run where every unit is read, encoded and committed on the
workers: ``UnitReadDecode`` (CPU tasks) and ``UnitEncodeWriter`` (the encode actor pool).

One Ray Data block is one work unit from the first operator to the last: the input dataset is
``range(n_units)`` with one block per unit, a decode task turns a unit number into that unit's
decoded block, and block splitting is off for the job (``target_max_block_size=None``), so the
encode actor always holds whole units and can write each unit's shard itself
(:mod:`asvr.pipeline.output.commit`).  It checks that it does (a unit arriving in pieces is an error,
never a short shard).  The cost: a decoded unit is one object, ``shard_size x S x S x 3`` bytes
(1000 images at 384 px: 442 MB), and a unit is decoded by one task; with units of 1000 and
many units per CPU this keeps every CPU busy, with a handful of units it does not.

``UnitReadDecode`` reads the unit's plan rows from ``OUT/.plan`` (only the row groups it needs),
marks the duplicates of ``.plan/dups.parquet`` and the ignored rows, hashes the unit's inputs and
asks the unit's marker whether it is already done; a done unit becomes one row carrying its
record, anything else goes through :class:`asvr.pipeline.job.stages.ReadDecode` unchanged.
``UnitEncodeWriter`` wraps :class:`asvr.pipeline.job.stages.Encoder` (codes in ``batch_size``
slices), builds the unit's shard rows and failure rows in plan order, commits shard + marker, and
emits one row per unit: the record as JSON, plus worker seconds.  Only that row reaches the
driver; the codes go from the actor to the shard file.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from asvr.tokenizer.preprocess import PreprocessConfig
from asvr.core.shards import ShardMeta, ShardRow

from asvr.pipeline.output.commit import CommitRecord, UnitStore
from asvr.pipeline.job.plan import read_dups, read_rows, unit_segments
from asvr.pipeline.job.stages import Encoder, ReadDecode, TokenizerBuilder
from asvr.pipeline.output.writer import commit_code_rows, units_hash

_TEXT = ("items_sha256", "key", "source", "status", "note", "stage", "error", "record")


class UnitReadDecode:
    """``map_batches`` function: unit numbers (``id``) -> one decoded block per unit."""

    def __init__(
        self,
        cfg: PreprocessConfig,
        plan_folder: str,
        starts: np.ndarray,
        shard_size: int,
        store: UnitStore,
        has_duplicates: bool,
    ):
        self.cfg, self.plan_folder, self.starts = cfg, plan_folder, starts
        self.shard_size, self.store, self.has_duplicates = shard_size, store, has_duplicates

    def unit(self, u: int) -> dict[str, np.ndarray]:
        n_total = int(self.starts[-1])
        lo, hi = u * self.shard_size, min(n_total, (u + 1) * self.shard_size)
        segments = unit_segments(self.starts, lo, hi)
        rows = pa.concat_tables([read_rows(self.plan_folder, j, a, b) for j, a, b in segments])
        keys, sources = rows.column("key").to_pylist(), rows.column("source").to_pylist()
        h = units_hash(keys, sources)
        n = len(keys)
        s = self.cfg.image_size
        done = self.store.done(u, h)
        if done is not None:
            return _block(u, n, h, 1, pixels=np.zeros((1, s, s, 3), np.uint8), status=["done"], record=[done.to_json()])
        dups = read_dups(self.plan_folder, segments) if self.has_duplicates else {}
        where = [(j, r) for j, a, b in segments for r in range(a, b)]
        kinds = rows.column("kind").to_pylist()
        errors = rows.column("error").to_pylist()
        status, note = [], []
        for i in range(n):
            if kinds[i] == "ignored":
                status.append("ignored")
                note.append(errors[i] or "")
            elif where[i] in dups:
                status.append("duplicate")
                note.append(f"duplicate key, first seen at {dups[where[i]]}")
            else:
                status.append("todo")
                note.append("")
        todo = np.flatnonzero(np.asarray(status, object) == "todo")
        block = _block(u, n, h, n, pixels=np.zeros((n, s, s, 3), np.uint8), key=keys, source=sources)
        block["status"] = np.array(status, object)
        block["note"] = np.array(note, object)
        if len(todo):
            sel = rows.take(pa.array(todo, pa.int64()))
            plan_batch = {c: sel.column(c).to_numpy(zero_copy_only=False) for c in sel.column_names}
            plan_batch["idx"] = todo
            dec = ReadDecode(self.cfg)(plan_batch)
            for k in ("ok", "width", "height", "pixels", "t_read", "t_decode"):
                block[k][todo] = dec[k]
            for k in ("stage", "error", "sha256", "caption"):
                block[k][todo] = [
                    v if isinstance(v, str) else ("" if k in ("stage", "error") else None) for v in dec[k]
                ]
        return block

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blocks = [self.unit(int(u)) for u in batch["id"]]
        return blocks[0] if len(blocks) == 1 else {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _block(u: int, n_items: int, h: str, n: int, pixels: np.ndarray, **cols) -> dict[str, np.ndarray]:
    """``n`` rows of one unit; text columns hold "" (never all-None: Arrow would type them null)."""
    block: dict[str, np.ndarray] = {
        "unit": np.full(n, u, np.int64),
        "n_items": np.full(n, n_items, np.int64),
        **{k: np.array([""] * n, object) for k in _TEXT},
        "items_sha256": np.array([h] * n, object),
        "sha256": np.array([None] * n, object),
        "caption": np.array([None] * n, object),
        "ok": np.zeros(n, bool),
        "width": np.zeros(n, np.int32),
        "height": np.zeros(n, np.int32),
        "pixels": pixels,
        "t_read": np.zeros(n),
        "t_decode": np.zeros(n),
    }
    for k, v in cols.items():
        block[k] = np.array(v, object)
    return block


class UnitEncodeWriter:
    """``map_batches`` callable class (the encode actor): whole decoded units -> one commit record each."""

    def __init__(self, builder: TokenizerBuilder, store: UnitStore, fmt: str, meta: ShardMeta, batch_size: int):
        self.enc = Encoder(builder)
        self.store, self.fmt, self.meta, self.batch_size = store, fmt, meta, batch_size

    def codes(self, ok: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Codes of the rows where ``ok``, encoded ``batch_size`` images at a time."""
        idx = np.flatnonzero(ok)
        out = np.zeros((len(idx), self.enc.ncodes), np.uint16)
        t0 = time.perf_counter()
        for i in range(0, len(idx), self.batch_size):
            sl = idx[i : i + self.batch_size]
            out[i : i + len(sl)] = self.enc({"ok": np.ones(len(sl), bool), "pixels": pixels[sl]})["codes"]
        return out, time.perf_counter() - t0

    def commit(self, b: dict[str, np.ndarray], rows: np.ndarray) -> tuple[CommitRecord, int, float, float]:
        u = int(b["unit"][rows[0]])
        if len(rows) != int(b["n_items"][rows[0]]):
            raise RuntimeError(f"unit {u} reached the encode actor in pieces ({len(rows)} of {b['n_items'][rows[0]]})")
        status = b["status"][rows]
        ok = (status == "todo") & b["ok"][rows].astype(bool)
        # a unit's rows are one contiguous run of the block (one unit = one block): a view, not a copy
        # of its pixels (a 384-px unit of 1000 images is 442 MB)
        contiguous = int(rows[-1]) - int(rows[0]) + 1 == len(rows)
        pixels = b["pixels"][rows[0] : rows[-1] + 1] if contiguous else b["pixels"][rows]
        codes, t_encode = self.codes(ok, pixels)
        t0 = time.perf_counter()
        shard: list[ShardRow] = []
        failures = []
        c = 0
        for j, i in enumerate(rows.tolist()):
            key, source = b["key"][i], b["source"][i]
            if status[j] in ("ignored", "duplicate"):
                failures.append({"key": key, "source": source, "stage": status[j], "error": b["note"][i]})
            elif not ok[j]:
                failures.append({"key": key, "source": source, "stage": b["stage"][i], "error": b["error"][i]})
            else:
                cap = b["caption"][i]
                w, h = int(b["width"][i]), int(b["height"][i])
                shard.append(ShardRow(key, codes[c], b["sha256"][i], w, h, cap if isinstance(cap, str) else None))
                c += 1
        ndup, nign = int((status == "duplicate").sum()), int((status == "ignored").sum())
        counts = {
            "seen": len(rows) - nign,
            "encoded": len(shard),
            "failed": len(failures) - ndup - nign,
            "duplicate": ndup,
            "ignored": nign,
        }
        r = commit_code_rows(
            self.store, self.fmt, u, str(b["items_sha256"][rows[0]]), self.meta, shard, failures, counts
        )
        return r, int((status == "todo").sum()), t_encode, time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units, first = np.unique(batch["unit"], return_index=True)
        out: dict[str, list] = {k: [] for k in ("unit", "record", "images", "skipped", "t_read", "t_decode")}
        out |= {"t_encode": [], "t_write": []}
        for u in units[np.argsort(first)]:
            rows = np.flatnonzero(batch["unit"] == u)
            if batch["status"][rows[0]] == "done":
                rec, images, te, tw, skipped = CommitRecord.from_json(batch["record"][rows[0]]), 0, 0.0, 0.0, True
            else:
                (rec, images, te, tw), skipped = self.commit(batch, rows), False
            for k, v in zip(
                out,
                (
                    int(u),
                    rec.to_json(),
                    images,
                    skipped,
                    float(batch["t_read"][rows].sum()),
                    float(batch["t_decode"][rows].sum()),
                    te,
                    tw,
                ),
            ):
                out[k].append(v)
        return {
            "unit": np.array(out["unit"], np.int64),
            "record": np.array(out["record"], object),
            "images": np.array(out["images"], np.int64),
            "skipped": np.array(out["skipped"], bool),
            **{k: np.array(out[k], np.float64) for k in ("t_read", "t_decode", "t_encode", "t_write")},
        }
