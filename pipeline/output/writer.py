"""The output directory: run config check, work units, atomic shards, manifest, failures.

Resume protocol.  The plan (``plan.py``, listed in Ray tasks into ``OUT/.plan``) is cut into work units of
``shard_size`` consecutive inputs; unit ``u`` writes ``part-{u:05d}.parquet``
(or ``shard-{u:05d}.tar``): shard names come from unit numbers, never from
keys.  A unit commits in two atomic steps: the shard (temp name, fsync,
rename: :mod:`asvr.core.shards`), then ``.units/unit-{u:05d}.json``, which
records the hash of the unit's inputs (keys + sources), the shard's sha256 and
size, the unit's failure rows and counts.  A unit is done only when its marker
exists, its input hash matches this run's plan, and its shard exists with the
recorded size: a kill -9 between the two steps leaves a shard without a marker,
and the rerun rewrites that unit (same rows, atomic replace).  Checking the size
rather than re-hashing keeps a restart over 10k shards cheap; ``asvr-pipeline
verify`` re-hashes everything.  Both steps run in the encode actor that encoded the unit, on
whichever node it is (:mod:`asvr.pipeline.output.commit`, :func:`commit_code_rows`); the driver holding
this :class:`OutputDir` only checks the run config, keeps the lock, sweeps temp files and writes
the manifest and failures table from the units' records.

If inputs change between runs (files added to a folder), only units whose
inputs changed are redone.  What changes *codes* (tokenizer fingerprint,
preprocess mode, fast decode, max pixels, encoder dtype) or the unit layout
(shard size, format) is recorded in ``manifest.json`` at the start of a run,
and a different value is refused unless ``--overwrite``.

``manifest.json`` is written at the start (``complete: false``) and rewritten at
the end (``complete: true``) with the shard list and counts; it holds no times,
so a resumed run's manifest equals an uninterrupted run's.  ``failures.parquet``
(``key, source, stage, error``) holds failed *and* duplicate inputs, so that
every input is in exactly one shard row or one failure row; the manifest's
``failed`` counts the former, ``duplicate`` the latter.  It also lists, at stage
``ignored``, the files and tar members that are not input images (counted as
``ignored``, not in ``seen``), so every member of every input is accounted for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.locks import FolderLock, FolderLocked
from asvr.core.shards import (
    FAILURES,
    MANIFEST,
    ShardMeta,
    ShardRow,
    rows_table,
    rows_to_table,
    write_parquet_shard,
    write_webdataset_shard,
)

from asvr.pipeline.output.commit import UNITS_DIR, CommitRecord, OutputError, UnitStore, _writing

LOCK = ".lock"
PLAN_DIR = ".plan"
MANIFEST_VERSION = 1
COUNTS = ("seen", "encoded", "failed", "duplicate", "ignored")
FAILURE_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("stage", pa.string()), ("error", pa.string())]
)

UnitResult = CommitRecord  # the name this module used before the commit protocol moved to commit.py
__all__ = ["OutputError", "UnitResult", "_writing", "rows_to_table"]


def shard_name(unit: int, fmt: str) -> str:
    return f"part-{unit:05d}.parquet" if fmt == "parquet" else f"shard-{unit:05d}.tar"


def unit_store(out: str | os.PathLike, fmt: str) -> UnitStore:
    """The shard naming of :func:`shard_name` as a :class:`UnitStore` (what a worker gets)."""
    return UnitStore(str(out), "part-", ".parquet") if fmt == "parquet" else UnitStore(str(out), "shard-", ".tar")


def units_hash(keys, sources) -> str:
    h = hashlib.sha256()
    for k, s in zip(keys, sources):
        h.update(k.encode("utf-8", "surrogatepass") + b"\0" + s.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def commit_code_rows(
    store: UnitStore,
    fmt: str,
    unit: int,
    items_sha256: str,
    meta: ShardMeta,
    rows: Sequence[ShardRow],
    failures: list[dict],
    counts: dict,
) -> CommitRecord:
    """The unit's shard rows (plan order) -> shard + marker.
    Runs wherever the rows are: in the encode actor (a cluster node) or, in tests, in-process."""
    n = len(rows)

    def write(path: Path) -> str:
        table = rows_table(meta, rows)
        return (write_parquet_shard if fmt == "parquet" else write_webdataset_shard)(path, table)

    return store.commit(unit, items_sha256, n, write, failures, counts)


class OutputDir:
    """OUT, locked for the duration of a run (``asvr.core.locks``: the kernel drops it on kill -9)."""

    def __init__(self, out: str | os.PathLike, run_config: dict, overwrite: bool = False):
        self.out = Path(out)
        self.run_config = run_config
        self.fmt = run_config["format"]
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} exists and is not a folder")
        with _writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        self.units_dir = self.out / UNITS_DIR
        self.store = unit_store(self.out, self.fmt)
        self.resuming = False
        """True when OUT holds an unfinished run with these settings (its plan may be reused)."""
        try:
            self._lock = FolderLock(self.out, "asvr-pipeline run")
        except FolderLocked as e:
            raise OutputError(str(e)) from None
        self._check_or_reset(overwrite)
        self.units_dir.mkdir(exist_ok=True)
        self.store.sweep()  # a killed run's half-written files; never visible as shards

    def close(self):
        self._lock.close()

    # ------------------------------------------------------------------ run config
    def _ours(self) -> list[Path]:
        return (
            sorted(self.out.glob("part-*.parquet"))
            + sorted(self.out.glob("shard-*.tar"))
            + [p for p in (self.out / MANIFEST, self.out / FAILURES) if p.exists()]
        )

    def _check_or_reset(self, overwrite: bool) -> None:
        mpath = self.out / MANIFEST
        if overwrite:
            for p in self._ours():
                p.unlink()
            if self.units_dir.exists():
                for p in self.units_dir.iterdir():
                    p.unlink()
            shutil.rmtree(self.out / PLAN_DIR, ignore_errors=True)
            return
        if not mpath.exists():
            if any(self._ours()):
                raise OutputError(f"{self.out} holds shards but no {MANIFEST}; pass --overwrite to replace them")
            return
        try:
            manifest = json.loads(mpath.read_text())
            old = manifest["run"]
        except (ValueError, KeyError) as e:
            raise OutputError(f"{mpath} is unreadable ({e}); pass --overwrite to start again") from None
        diff = [k for k in self.run_config if old.get(k) != self.run_config[k]]
        if diff:
            what = ", ".join(f"{k} {old.get(k)!r} -> {self.run_config[k]!r}" for k in diff)
            raise OutputError(f"{self.out} was written with other settings ({what}); pass --overwrite to replace it")
        self.resuming = not manifest.get("complete", False)

    # ------------------------------------------------------------------ units
    def marker_path(self, unit: int) -> Path:
        return self.store.marker_path(unit)

    def done(self, unit: int, items_sha256: str) -> UnitResult | None:
        return self.store.done(unit, items_sha256)

    def commit_unit(
        self,
        unit: int,
        items_sha256: str,
        meta: ShardMeta,
        rows: Sequence[ShardRow],
        failures: list[dict],
        counts: dict,
    ) -> UnitResult:
        """The unit's shard rows (plan order). Shard, then marker."""
        return commit_code_rows(self.store, self.fmt, unit, items_sha256, meta, rows, failures, counts)

    # ------------------------------------------------------------------ manifest
    def write_manifest(self, inputs: list[dict], results: list[UnitResult] | None, n_units: int) -> dict:
        """``results=None``: the start-of-run manifest (complete: false); else every unit's result, in order."""
        final = results is not None
        results = results or []
        counts = {k: sum(r.counts.get(k, 0) for r in results) for k in COUNTS}
        manifest = {
            "version": MANIFEST_VERSION,
            "complete": final,
            "run": self.run_config,
            "fingerprint": self.run_config["fingerprint"],
            "inputs": inputs,
            "units": n_units,
            "shards": [{"file": r.shard, "rows": r.rows, "sha256": r.sha256} for r in results if r.shard],
            "counts": counts,
        }
        if final:
            with _writing(self.out / FAILURES):
                self._write_failures(results)
            self._remove_stale(n_units)
            self.store.sweep()  # temp files of workers killed mid-shard whose unit Ray then redid
        with _writing(self.out / MANIFEST):
            atomic_write(self.out / MANIFEST, (json.dumps(manifest, indent=2) + "\n"))
        return manifest

    def _write_failures(self, results: list[UnitResult]) -> None:
        rows = [f for r in results for f in r.failures]
        table = pa.Table.from_pylist([{k: f[k] for k in FAILURE_SCHEMA.names} for f in rows], schema=FAILURE_SCHEMA)
        with atomic_path(self.out / FAILURES) as tmp:
            pq.write_table(table, tmp)

    def _remove_stale(self, n_units: int) -> None:
        """Shards and markers of units beyond this plan (a shorter input list than a previous run)."""
        for pattern in ("part-*.parquet", "shard-*.tar"):
            for p in self.out.glob(pattern):
                num = p.name.split("-", 1)[1].split(".", 1)[0]
                if num.isdigit() and (
                    int(num) >= n_units or p.suffix != (".parquet" if self.fmt == "parquet" else ".tar")
                ):
                    p.unlink()
        for p in self.units_dir.glob("unit-*.json"):
            num = p.stem.split("-", 1)[1]
            if num.isdigit() and int(num) >= n_units:
                p.unlink()
