"""The plan, listed in Ray tasks and kept in ``OUT/.plan``, so the driver never holds it.

``sources.discover`` lists every INPUT in one process and returns the whole plan (one Python
object per image: ~1.9 h and ~90 GB at 100M images, issue 28).  Here the driver only expands
the INPUT arguments (globs, brace patterns) and cuts them into *listing jobs*: one per tar,
Parquet file, LLaVA JSON or plug-in input, and one per top-level subfolder of a folder INPUT plus
one for the folder's own files (:func:`asvr.pipeline.inputs.sources.folder_parts`; their concatenation is
exactly ``os.walk``'s order, so the plan is the one ``discover`` gives).  Each job runs the
format's own ``scan`` in a Ray task, on any node, and writes:

* ``.plan/part-JJJJJ.parquet``: its plan rows (``PLAN_SCHEMA``), row groups of
  :data:`ROWS_PER_GROUP` so a unit reads only the groups it covers;
* ``.plan/keys-JJJJJ.arrow``: ``key, row, source`` of its non-ignored rows, one Arrow IPC record
  batch per key bucket (``blake2b(key) % BUCKETS``), for the duplicate search;
* ``.plan/part-JJJJJ.json``: what was listed (the job, the input's size and mtime) and the row
  count, written last (atomic): the plan is written as it goes, and an interrupted run's listing
  resumes from the jobs it finished.

Duplicates (a key seen earlier in plan order, across all inputs) are found without the driver:
one task per bucket reads its batch of every ``keys`` file, sorts by ``(key, job, row)`` and
keeps the first of each key; one task merges the buckets' duplicates into ``.plan/dups.parquet``
sorted by ``(job, row)``.  ``.plan/plan.json`` (the jobs, their row counts, the duplicate count)
is written when all of that is done; a rerun of an unfinished run (manifest ``complete: false``,
same settings) with the same jobs reuses it and lists nothing.  A finished OUT is relisted (a new
run over what may be new inputs); so is a job whose input file changed size or mtime.  A file
added deep inside a folder during an interrupted run is only seen after the run completes (the
folder itself is not re-walked on resume).

The driver keeps one integer per listing job (rows) and nothing per image.  Units are
``shard_size`` consecutive plan rows across jobs (:func:`unit_segments`), computed wherever a
unit is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from asvr.core.atomic import atomic_path, atomic_write

from asvr.pipeline.inputs.folder import _scan_folder, folder_parts
from asvr.pipeline.inputs.sources import SourceOptions, _Rows, detect_format, expand_inputs, input_formats

ROWS_PER_GROUP = 4096
BUCKETS = 16
"""Key buckets of the duplicate search: each bucket task holds ~1/16 of all keys (100M keys of
~40 bytes: ~400 MB per task)."""
DUPS_SCHEMA = pa.schema([("job", pa.int64()), ("row", pa.int64()), ("first_source", pa.string())])
KEYS_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.int64()), ("source", pa.string())])


@dataclass(frozen=True)
class ListJob:
    index: int
    path: str
    format: str
    part: str | None = None
    """folder INPUTs: one of ``sources.folder_parts``; None for every other format."""
    stamp: tuple[int, int] = (0, 0)
    """(size, mtime_ns) of the file (or the listed folder) when the run started."""

    def describe(self) -> dict:
        return asdict(self) | {"stamp": list(self.stamp)}


@dataclass
class Plan:
    """What the driver keeps of the plan: rows per listing job."""

    folder: str
    jobs: list[ListJob]
    rows: list[int]
    duplicates: int
    reused: int
    """Listing jobs whose plan part an earlier, interrupted run had written."""

    @property
    def total(self) -> int:
        return int(sum(self.rows))

    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.asarray(self.rows, np.int64))])


def _stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return (0 if p.is_dir() else st.st_size, st.st_mtime_ns)


def listing_jobs(inputs: list[str], opts: SourceOptions) -> tuple[list[ListJob], list[dict]]:
    """The driver's part: INPUT arguments -> listing jobs in plan order + one ``{path, format}``
    per expanded INPUT (the manifest's ``inputs``).  Stats each INPUT and scans a folder's top level."""
    jobs: list[ListJob] = []
    described = []
    for path in expand_inputs(inputs):
        fmt = detect_format(path) if opts.input_format == "auto" else opts.input_format
        ap = str(path.absolute())
        if fmt == "folder":
            for part in folder_parts(path):
                jobs.append(ListJob(len(jobs), ap, fmt, part, _stamp(path / part if part else path)))
        else:
            jobs.append(ListJob(len(jobs), ap, fmt, None, _stamp(path)))
        described.append({"path": ap, "format": fmt})
    return jobs, described


# --------------------------------------------------------------------------- tasks (any node)
def _part(folder: Path, job: int, ext: str) -> Path:
    return folder / f"part-{job:05d}.{ext}" if ext != "arrow" else folder / f"keys-{job:05d}.arrow"


def bucket_of(keys: list[str], buckets: int = BUCKETS) -> np.ndarray:
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            % buckets
            for k in keys
        ),
        np.int64,
        len(keys),
    )


def list_job(job: ListJob, opts: SourceOptions, folder: str, options_id: str) -> int:
    """One listing job: scan, write its plan part, its bucketed keys, then its record. -> rows."""
    out = Path(folder)
    rows = _Rows()
    if job.format == "folder":
        _scan_folder(Path(job.path), rows, opts, job.part)
    else:
        input_formats()[job.format].scan(Path(job.path), rows, opts)
    table = rows.table()
    with atomic_path(_part(out, job.index, "parquet")) as tmp:
        pq.write_table(table, tmp, row_group_size=ROWS_PER_GROUP)
    keep = np.flatnonzero(np.asarray(table.column("kind").to_pylist(), object) != "ignored")
    keys = table.column("key").take(pa.array(keep, pa.int64()))
    sources = table.column("source").take(pa.array(keep, pa.int64()))
    bucket = bucket_of(keys.to_pylist())
    with atomic_path(_part(out, job.index, "arrow")) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, KEYS_SCHEMA) as w:
            for b in range(BUCKETS):
                sel = pa.array(np.flatnonzero(bucket == b), pa.int64())
                w.write_batch(
                    pa.record_batch(
                        [
                            keys.take(sel).combine_chunks(),
                            pa.array(keep[sel.to_numpy()], pa.int64()),
                            sources.take(sel).combine_chunks(),
                        ],
                        schema=KEYS_SCHEMA,
                    )
                )
    record = {"job": job.describe(), "options": options_id, "rows": table.num_rows}
    atomic_write(_part(out, job.index, "json"), json.dumps(record))
    return table.num_rows


def dedupe_bucket(bucket: int, jobs: list[int], folder: str) -> pa.Table:
    """Every later occurrence of a key of this bucket: (job, row, source of the first)."""
    parts = []
    for j in jobs:
        with pa.memory_map(str(_part(Path(folder), j, "arrow"))) as src:
            batch = ipc.open_file(src).get_batch(bucket)
            if batch.num_rows:
                t = pa.Table.from_batches([batch])
                parts.append(t.append_column("job", pa.array(np.full(t.num_rows, j, np.int64))))
    if not parts:
        return DUPS_SCHEMA.empty_table()
    t = pa.concat_tables(parts)
    t = t.take(pc.sort_indices(t, sort_keys=[("key", "ascending"), ("job", "ascending"), ("row", "ascending")]))
    keys = t.column("key")
    first = np.ones(t.num_rows, bool)
    if t.num_rows > 1:
        first[1:] = ~pc.equal(keys.slice(1), keys.slice(0, t.num_rows - 1)).to_numpy(zero_copy_only=False)
    group_first = np.flatnonzero(first)[np.cumsum(first) - 1]
    dup = np.flatnonzero(~first)
    if not len(dup):
        return DUPS_SCHEMA.empty_table()
    return pa.table(
        [
            t.column("job").take(pa.array(dup)),
            t.column("row").take(pa.array(dup)),
            t.column("source").take(pa.array(group_first[dup])),
        ],
        schema=DUPS_SCHEMA,
    )


def merge_dups(folder: str, *tables: pa.Table) -> int:
    t = pa.concat_tables([DUPS_SCHEMA.empty_table(), *tables])
    t = t.take(pc.sort_indices(t, sort_keys=[("job", "ascending"), ("row", "ascending")]))
    with atomic_path(Path(folder) / "dups.parquet") as tmp:
        pq.write_table(t, tmp, row_group_size=ROWS_PER_GROUP)
    return t.num_rows


# --------------------------------------------------------------------------- driver
def _options_id(opts: SourceOptions) -> str:
    return hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode()).hexdigest()[:16]


def _reusable(folder: Path, job: ListJob, options_id: str) -> int | None:
    """Rows of a job an interrupted run already listed (same job, same input stamp), else None."""
    try:
        rec = json.loads(_part(folder, job.index, "json").read_text())
    except (OSError, ValueError):
        return None
    if rec.get("job") != job.describe() or rec.get("options") != options_id:
        return None
    if not (_part(folder, job.index, "parquet").exists() and _part(folder, job.index, "arrow").exists()):
        return None
    return int(rec["rows"])


def build_plan(
    jobs: list[ListJob],
    opts: SourceOptions,
    folder: str | os.PathLike,
    resume: bool,
    ensure_ray: Callable[[], None] | None,
    progress: Callable[[int], None] = lambda n: None,
) -> Plan:
    """List every job in Ray tasks, find the duplicates in Ray tasks, write ``plan.json``.
    ``resume``: reuse what an interrupted run listed.  ``ensure_ray``: starts (or joins) Ray;
    None runs the same functions in this process (one listing job on a machine of its own: Ray
    would add its start-up and no parallelism)."""
    if ensure_ray is None:
        return _build(jobs, opts, Path(folder), resume, progress, None)
    ensure_ray()
    import ray

    return _build(jobs, opts, Path(folder), resume, progress, ray)


def _remote(ray, fn: Callable) -> Any:
    """``fn`` as a Ray task (one CPU, no retries), or ``fn`` itself when listing in-process."""
    if ray is None:
        return fn
    return ray.remote(num_cpus=1, max_retries=0)(fn).remote


def _get(ray, ref):
    return ref if ray is None else ray.get(ref)


def _finished_plan(folder: Path, jobs, described: list, oid) -> Plan | None:
    """The plan a previous run finished for the same jobs and options, else None."""
    try:
        old = json.loads((folder / "plan.json").read_text())
        if old["jobs"] == described and old["options"] == oid and (folder / "dups.parquet").exists():
            return Plan(str(folder), jobs, old["rows"], old["duplicates"], len(jobs))
    except (OSError, ValueError, KeyError):
        pass
    return None


def _list_rows(jobs, opts, folder: Path, oid, resume: bool, progress, ray) -> tuple[list[int | None], int]:
    """Each job's row count, listing the jobs a previous run did not -> (rows, jobs reused)."""
    rows: list[int | None] = [None] * len(jobs)
    reused = 0
    if resume:
        for j in jobs:
            rows[j.index] = _reusable(folder, j, oid)
        reused = sum(r is not None for r in rows)
    list_remote = _remote(ray, list_job)
    todo = [j for j in jobs if rows[j.index] is None]
    pending = {list_remote(j, opts, str(folder), oid): j.index for j in todo} if ray else {}
    for j in todo if ray is None else []:
        rows[j.index] = list_job(j, opts, str(folder), oid)
        progress(1)
    while pending:
        ready = list(pending)[:1] if ray is None else ray.wait(list(pending), num_returns=1)[0]
        for ref in ready:
            rows[pending.pop(ref)] = _get(ray, ref)
            progress(1)
    return rows, reused


def _build(jobs, opts, folder: Path, resume: bool, progress, ray) -> Plan:
    oid = _options_id(opts)
    index = folder / "plan.json"
    described = [j.describe() for j in jobs]
    if resume:
        if (done := _finished_plan(folder, jobs, described, oid)) is not None:
            return done
    else:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    index.unlink(missing_ok=True)
    rows, reused = _list_rows(jobs, opts, folder, oid, resume, progress, ray)
    counts = [int(r or 0) for r in rows]
    nonempty = [j.index for j in jobs if counts[j.index]]
    bucket_remote = _remote(ray, dedupe_bucket)
    buckets = [bucket_remote(b, nonempty, str(folder)) for b in range(BUCKETS)]
    duplicates = int(_get(ray, _remote(ray, merge_dups)(str(folder), *buckets)))
    atomic_write(index, json.dumps({"jobs": described, "options": oid, "rows": counts, "duplicates": duplicates}))
    return Plan(str(folder), jobs, counts, duplicates, reused)


# --------------------------------------------------------------------------- reading a unit
def unit_segments(starts: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Plan rows ``[lo, hi)`` as ``(job, first row, end row)`` pieces of the jobs they fall in."""
    out = []
    j = int(np.searchsorted(starts, lo, side="right")) - 1
    while lo < hi:
        end = min(hi, int(starts[j + 1]))
        if end > lo:
            out.append((j, lo - int(starts[j]), end - int(starts[j])))
        lo = max(lo, end)
        j += 1
    return out


def read_rows(folder: str, job: int, a: int, b: int) -> pa.Table:
    """Rows ``[a, b)`` of a job's plan part, reading only the row groups they lie in."""
    pf = pq.ParquetFile(_part(Path(folder), job, "parquet"))
    ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    g0, g1 = int(np.searchsorted(ends, a, side="right")), int(np.searchsorted(ends, b - 1, side="right"))
    t = pf.read_row_groups(list(range(g0, g1 + 1)))
    return t.slice(a - (int(ends[g0 - 1]) if g0 else 0), b - a)


def read_dups(folder: str, segments: list[tuple[int, int, int]]) -> dict[tuple[int, int], str]:
    """(job, row) -> source of the key's first occurrence, for the duplicates among ``segments``."""
    jobs = sorted({j for j, _, _ in segments})
    t = pq.read_table(Path(folder) / "dups.parquet", filters=[("job", "in", jobs)])
    found = {}
    for j, r, s in zip(t.column("job").to_pylist(), t.column("row").to_pylist(), t.column("first_source").to_pylist()):
        if any(j == sj and a <= r < b for sj, a, b in segments):
            found[(j, r)] = s
    return found
