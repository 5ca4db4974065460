"""Work-unit commits written where the work is done, collected by the driver: the protocol that
``asvr-pipeline`` jobs share (``tokenize`` today; any job that cuts its plan into numbered units).

The protocol.  A job cuts its plan into units ``0..N-1``; each unit has an *input hash* (for
``tokenize``: keys + sources of its plan rows, :func:`asvr.pipeline.output.writer.units_hash`).  The
process that produced a unit's rows (a Ray worker on any node) commits it itself, in two atomic
steps on the shared output folder:

1. the shard, through a writer that goes through :mod:`asvr.core.atomic` (temp name in the
   same folder, fsync, rename) and returns the file's sha256; a unit without rows removes a stale
   shard of an earlier run instead;
2. the marker ``.units/unit-NNNNN.json``: a :class:`CommitRecord` (file, rows, sha256, size,
   failure rows, counts, input hash), also atomic.

The marker is the commit point.  A unit is done only when its marker exists, names the same input
hash, and its shard exists with the recorded size (:meth:`UnitStore.done`; ``verify`` re-hashes).
A kill -9 of a worker or of the driver at any moment leaves either a temp file (never listed,
swept by :meth:`UnitStore.sweep` at the start and at the end of a run), or a shard without a
marker (the unit is redone: same bytes, atomic replace), or a committed unit.  Writes are
deterministic (same rows -> same bytes), so a unit written twice (Ray retries a block after a
worker died after its rename) gives the same shard and the same marker: a unit is in the manifest
once, with its shard and its failure rows (:class:`Commits` refuses two different records for one
unit).

The worker sends the driver only the record (a few hundred bytes plus its failure rows); the
driver (:class:`Commits`) keeps one record per unit and writes the manifest at the end.  It never
touches a row, a shard or a marker, so its cost is per unit, not per row.

Ray Data's own writers, evaluated first (Ray 2.60.0, ``ray/data/datasource/file_datasink.py``,
``datasink.py``):

* ``Dataset.write_parquet(path, min_rows_per_file=...)`` writes each write task's blocks to
  ``{dataset_uuid}_{task:06d}_{block:06d}-0.parquet`` (a ``FilenameProvider`` can rename) by
  opening the final path and writing into it: no temp name, no rename, no fsync, so a worker
  killed mid-write leaves a truncated file under a final name.  Files follow blocks and
  ``min_rows_per_file``, not plan units, so a file cannot be tied to "these 1000 inputs": after a
  crash nothing says which inputs a file holds or whether it is whole, and a rerun writes new
  UUID-named files beside the old ones (``mode=`` only decides about the whole folder).  No sha256.
* A custom ``Datasink``: ``write(blocks, ctx)`` runs in write tasks (so shards can be written on
  the workers, and we could do temp+fsync+rename there), but ``on_write_complete(WriteResult)``
  runs once on the driver when *every* write has finished: there is no per-unit commit the driver
  can record as it goes, so a driver killed at 99% keeps no record that any unit finished, and
  ``write_datasink`` returns nothing to stream (no progress per unit).  Blocks reach a write task
  in whatever bundles Ray Data forms, so a unit is whole in one task only if the job makes it one
  block anyway.  Failure rows would have to travel beside the data and be assembled by the driver.
* Neither has a failures table, input hashes, or a resume that skips finished units; both retry
  a failed write task, which is only safe because of names the job chooses.

So the job keeps its own two-step commit, written by the worker that encoded the unit (the
encode actor, :mod:`asvr.pipeline.job.unit_stages`), and Ray Data only moves blocks: one unit per
block, the commit record as the operator's output row.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from asvr.core.atomic import atomic_write
from asvr.core.errors import AsvrError

UNITS_DIR = ".units"


class OutputError(AsvrError):
    """OUT cannot be used as asked (foreign run, locked, a write failed): a one-line CLI error."""


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A write that fails (disk full, read-only, quota) is a one-line error naming the file;
    the rerun after freeing space resumes exactly (finished units are kept)."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0]
        raise OutputError(f"cannot write {path}: {reason}; finished shards are kept, free space and rerun") from None


@dataclass
class CommitRecord:
    """One finished unit, as its marker records it and as the driver receives it."""

    unit: int
    items_sha256: str
    shard: str | None
    rows: int
    sha256: str | None
    bytes: int
    failures: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CommitRecord":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class UnitStore:
    """The units of one output folder, as a worker sees them (pickles as three strings).

    ``prefix``/``suffix`` name the shards: unit ``u`` is ``{prefix}{u:05d}{suffix}``."""

    out: str
    prefix: str
    suffix: str

    @property
    def units_dir(self) -> Path:
        return Path(self.out) / UNITS_DIR

    def shard_path(self, unit: int) -> Path:
        return Path(self.out) / f"{self.prefix}{unit:05d}{self.suffix}"

    def marker_path(self, unit: int) -> Path:
        return self.units_dir / f"unit-{unit:05d}.json"

    def done(self, unit: int, items_sha256: str) -> CommitRecord | None:
        """The unit's record if it is committed for these inputs with its shard intact (by size)."""
        p = self.marker_path(unit)
        try:
            r = CommitRecord.from_json(p.read_text())
        except (OSError, ValueError, TypeError):
            return None
        if r.items_sha256 != items_sha256:
            return None
        if r.shard is not None:
            sp = Path(self.out) / r.shard
            try:
                if sp.stat().st_size != r.bytes:
                    return None
            except OSError:
                return None
        return r

    def commit(
        self,
        unit: int,
        items_sha256: str,
        rows: int,
        write: Callable[[Path], str] | None,
        failures: list[dict],
        counts: dict,
    ) -> CommitRecord:
        """Shard (``write(path) -> sha256``, atomic; None or ``rows == 0``: no shard), then marker."""
        path = self.shard_path(unit)
        shard = sha = None
        nbytes = 0
        if rows and write is not None:
            with _writing(path):
                sha = write(path)
            shard, nbytes = path.name, path.stat().st_size
        elif path.exists():
            path.unlink()
        r = CommitRecord(unit, items_sha256, shard, rows, sha, nbytes, failures, counts)
        with _writing(self.marker_path(unit)):
            atomic_write(self.marker_path(unit), r.to_json())
        return r

    def sweep(self) -> int:
        """Remove half-written files (``.NAME.tmp-*``) of killed writers; call only while no
        writer of this folder runs (the driver holds OUT's lock and no job is in flight)."""
        n = 0
        for folder in (Path(self.out), self.units_dir):
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
                n += 1
        return n


class CommitConflict(RuntimeError):
    """Two different records for one unit: the job is not deterministic (a bug, not bad input)."""


class Commits:
    """The driver's side: one record per unit, in unit order at the end."""

    def __init__(self, n_units: int):
        self.n_units = n_units
        self._by_unit: dict[int, CommitRecord] = {}

    def add(self, r: CommitRecord) -> bool:
        """True when the unit is new; a repeat (a retried block) must equal the first record."""
        if not 0 <= r.unit < self.n_units:
            raise CommitConflict(f"record for unit {r.unit}, the plan has {self.n_units} units")
        old = self._by_unit.get(r.unit)
        if old is None:
            self._by_unit[r.unit] = r
            return True
        if old != r:
            raise CommitConflict(f"unit {r.unit} was committed twice with different contents")
        return False

    def __len__(self) -> int:
        return len(self._by_unit)

    def missing(self) -> list[int]:
        return [u for u in range(self.n_units) if u not in self._by_unit]

    def ordered(self) -> list[CommitRecord]:
        missing = self.missing()
        if missing:
            raise OutputError(
                f"{len(missing)} of {self.n_units} units were not committed (first: {missing[0]}); "
                "rerun the same command to finish them"
            )
        return [self._by_unit[u] for u in range(self.n_units)]
