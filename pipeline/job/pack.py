"""``asvr-pipeline pack``: conversations + code shards -> packed shards (:mod:`asvr.core.packed`).

The job, as ``tokenize``: the driver plans, Ray tasks do the work, and each task commits its
own unit where it ran (:mod:`asvr.pipeline.output.commit`: shard ``packed-NNNNN.parquet``
through the atomic writer, then the marker ``.units/unit-NNNNN.json``); the driver only
collects the records and writes ``manifest.json`` and ``failures.parquet`` at the end.  So it
is exactly once and resumable after kill -9 (a rerun redoes only units without a valid
marker) with the same protocol and code as ``tokenize``.  Ray tasks rather than Ray Data: a
unit is one task's whole input (a slice of conversations), so there is no block stream to
shape, and a task returns its commit record.

The plan.  Units are ``--unit-size`` consecutive conversations (in file order) plus an equal
share of the caption-free keys, drawn as the trainer draws them (same rng and count rule over
the conversations that became samples: :class:`UnitPlan`).  Each task joins its conversations
with the code rows of their keys, renders, tokenizes, labels and packs them with the trainer's
own code (:func:`asvr.train.data.packed_build.pack_unit`: the one import from pipeline into
train, declared in pyproject.toml's import-linter contract; the alternative, moving the
templates and the data checks into core, would split the trainer's data path in two).  The
driver holds the key -> (shard, row) index of the code shards (one tuple per image) and the
conversation records, not codes or tokens.

The manifest's ``run`` (fingerprint, text tokenizer hash, template, max length, image tokens,
preprocessing, window, seed, unit size, caption-free ratio) is fixed at the first run: another
value is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.locks import FolderLock, FolderLocked
from asvr.core.signals import StopSignals, Stopped
from asvr.core.packed import PREFIX, SUFFIX, write_packed_shard
from asvr.core.shards import FAILURES, MANIFEST, ShardError, ShardMeta, list_shards, read_meta

from asvr.pipeline.output.commit import (
    UNITS_DIR,
    CommitConflict,
    CommitRecord,
    Commits,
    OutputError,
    UnitStore,
    _writing,
)
from asvr.pipeline.output.writer import FAILURE_SCHEMA


def _templates() -> tuple[str, ...]:
    from asvr.train.data.templates import TEMPLATES

    return tuple(TEMPLATES)


RAY = "Ray"


@dataclass(kw_only=True)
class PackConfig:
    """One pack job; every field is an ``asvr-pipeline pack`` option (``asvr.core.config_cli``)."""

    codes: str
    """Code shard folder (asvr-pipeline tokenize --format parquet)."""
    data: list[str] = field(metadata={"metavar": "JSON"})
    """LLaVA JSON / JSON Lines files."""
    model: str
    """The LLM folder whose tokenizer the run trains with."""
    out: str
    """Output folder of packed shards."""
    max_len: int = 2048
    """Tokens per packed row."""
    template: str = field(default="plain", metadata={"choices": _templates})
    """Conversation template (plain: pretraining's)."""
    caption_free_ratio: float = 0.0
    """Share of caption-free images, as asvr-train's."""
    image_tokens: int | None = None
    """LLM positions per image (default: grid H*W)."""
    window: int = 1024
    """Samples considered together by best-fit packing."""
    seed: int = 0
    """Packing order and caption-free draw."""
    unit_size: int = 4096
    """Conversations per unit of work and resume."""
    trust_remote_code: bool = False
    """Allow the LLM folder's tokenizer code."""
    num_cpus: int | None = field(default=None, metadata={"group": RAY})
    """CPUs of the local Ray instance (default: all)."""
    ray_address: str | None = field(default=None, metadata={"group": RAY})
    """Join this Ray cluster (or set RAY_ADDRESS); default: start a fresh local Ray."""
    overwrite: bool = False
    """Replace an OUT packed with other settings."""
    progress: bool = field(default=True, metadata={"flag": "--no-progress"})
    """(--no-progress) no progress bar."""
    verbose: bool = field(default=False, metadata={"short": "-v"})
    """Also show Ray's own warnings."""
    extra: dict = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self):
        if self.max_len < 1 or self.unit_size < 1 or self.window < 1:
            raise ValueError("--max-len, --unit-size and --window must be >= 1")
        if self.caption_free_ratio < 0:
            raise ValueError("--caption-free-ratio must be >= 0")


def _code_index(codes: str) -> tuple[ShardMeta, list[str], dict[str, tuple[str, int]]]:
    files = list_shards(codes)
    metas = [read_meta(f) for f in files]
    if len({(m.fingerprint, m.grid, m.depth, m.preprocess) for m in metas}) != 1:
        raise ShardError(f"{codes}: shards disagree on tokenizer fingerprint/grid/depth/preprocess mode")
    keys: list[str] = []
    where: dict[str, tuple[str, int]] = {}
    for f in files:
        if f.suffix != ".parquet":
            raise ShardError(f"{f}: pack reads Parquet code shards (tokenize with --format parquet)")
        col = pq.read_table(f, columns=["key"]).column("key").to_pylist()
        for row, k in enumerate(col):
            if k in where:
                raise ShardError(f"{codes}: key {k!r} is in two shard rows")
            where[k] = (str(f), row)
        keys.extend(col)
    return metas[0], keys, where


def _unit_hash(records, free: list[str], run: dict) -> str:
    h = hashlib.sha256(json.dumps(run, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps([r.sample_id, r.image, r.conversations, r.source, r.image_error]).encode())
    h.update(json.dumps(free).encode())
    return h.hexdigest()


def _pack_task(store: UnitStore, unit: int, items: str, records, free, locations, meta, cfg: dict, text_hash: str):
    """Runs in a Ray worker: pack one unit and commit it there (shard, then marker)."""
    from transformers import AutoTokenizer

    from asvr.train.data.packed_build import PackSettings, pack_unit, store_from_shards

    tok = AutoTokenizer.from_pretrained(cfg["model"], local_files_only=True, trust_remote_code=cfg["trust"])
    settings = PackSettings(**cfg["settings"])
    rows = pack_unit(unit, records, free, store_from_shards(meta, locations), tok, settings, text_hash)
    n = 0 if rows.table is None else rows.table.num_rows
    write = None if rows.table is None else (lambda p: write_packed_shard(p, rows.table))
    return store.commit(unit, items, n, write, rows.failures, rows.counts)


class PackOutput:
    """OUT of a pack run: lock, run-config check (or --overwrite), sweep, manifest, failures."""

    def __init__(self, out: str, run: dict, overwrite: bool):
        self.out = Path(out)
        with _writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = FolderLock(self.out, "asvr-pipeline pack")
        except FolderLocked as e:
            raise OutputError(str(e)) from None
        self.store = UnitStore(str(self.out), PREFIX, SUFFIX)
        self.run = run
        mpath = self.out / MANIFEST
        if overwrite:
            for p in self.out.glob(f"{PREFIX}*{SUFFIX}"):
                p.unlink()
            shutil.rmtree(self.out / UNITS_DIR, ignore_errors=True)
            mpath.unlink(missing_ok=True)
        elif mpath.exists():
            try:
                old = json.loads(mpath.read_text())["run"]
            except (ValueError, KeyError) as e:
                raise OutputError(f"{mpath} is unreadable ({e}); pass --overwrite to start again") from None
            diff = [k for k in run if old.get(k) != run[k]]
            if diff:
                what = ", ".join(f"{k} {old.get(k)!r:.40} -> {run[k]!r:.40}" for k in diff)
                raise OutputError(f"{self.out} was packed with other settings ({what}); pass --overwrite to replace it")
        elif any(self.out.glob(f"{PREFIX}*{SUFFIX}")):
            raise OutputError(f"{self.out} holds packed shards but no {MANIFEST}; pass --overwrite to replace them")
        (self.out / UNITS_DIR).mkdir(exist_ok=True)
        self.store.sweep()

    def write_manifest(self, meta: dict, n_units: int, results: list[CommitRecord] | None) -> dict:
        final = results is not None
        results = results or []
        keys = sorted({k for r in results for k in r.counts})
        manifest = {
            "version": 1,
            "kind": "packed",
            "complete": final,
            "run": self.run,
            "meta": meta,
            "units": n_units,
            "shards": [{"file": r.shard, "rows": r.rows, "sha256": r.sha256} for r in results if r.shard],
            "counts": {k: sum(r.counts.get(k, 0) for r in results) for k in keys},
        }
        if final:
            rows = [f for r in results for f in r.failures]
            table = pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)
            with _writing(self.out / FAILURES), atomic_path(self.out / FAILURES) as tmp:
                pq.write_table(table, tmp)
            for p in self.out.glob(f"{PREFIX}*{SUFFIX}"):  # units beyond this plan (a shorter input)
                num = p.name[len(PREFIX) : -len(SUFFIX)]
                if num.isdigit() and int(num) >= n_units:
                    p.unlink()
            self.store.sweep()
        with _writing(self.out / MANIFEST):
            atomic_write(self.out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return manifest

    def close(self) -> None:
        self._lock.close()


class UnitPlan:
    """The units of a run and their caption-free share, drawn exactly as the trainer draws them:
    ``n_free = r/(1-r) * n_conv`` over the conversations that *became samples*.  That count is
    known only once the units are tokenized, so the plan starts from an estimate (per unit: the
    count in its marker from an earlier run, else its records minus those already known bad
    without a tokenizer: malformed image fields, images in no shard), runs the units, and
    re-plans with the true count if it differs: the count of a unit does not depend on its
    caption-free share, so a second pass is the last (it redoes the units whose share changed).
    The usual cases (no bad conversation, or only ones found without a tokenizer; a rerun) take
    one pass."""

    def __init__(self, cfg: PackConfig, records, keys: list[str], where: dict, run: dict, draw):
        self.cfg, self.records, self.keys, self.where, self.run_meta, self.draw = cfg, records, keys, where, run, draw
        self.n_units = max(1, -(-len(records) // cfg.unit_size))
        self.referenced = {r.image for r in records if r.image is not None}

    def unit_records(self, u: int):
        return self.records[u * self.cfg.unit_size : (u + 1) * self.cfg.unit_size]

    def estimate(self, store: UnitStore, u: int) -> int:
        try:
            return int(CommitRecord.from_json(store.marker_path(u).read_text()).counts["conversations"])
        except (OSError, ValueError, TypeError, KeyError):
            recs = self.unit_records(u)
            return sum(r.image_error is None and (r.image is None or r.image in self.where) for r in recs)

    def todo(self, store: UnitStore, n_conv: int, commits: Commits) -> list:
        """The units to run for ``n_conv`` conversations (the others' records added to ``commits``)."""
        free = self.draw(self.keys, self.referenced, self.cfg.caption_free_ratio, n_conv, self.cfg.seed)
        todo = []
        for u in range(self.n_units):
            recs = self.unit_records(u)
            fr = free[u * len(free) // self.n_units : (u + 1) * len(free) // self.n_units]
            items = _unit_hash(recs, fr, self.run_meta)
            done = store.done(u, items)
            if done is not None:
                commits.add(done)
                continue
            locs = {k: self.where[k] for k in [r.image for r in recs if r.image in self.where] + fr}
            todo.append((u, items, recs, fr, locs))
        return todo

    def run(self, store: UnitStore, execute) -> tuple[list[CommitRecord], int]:
        """-> (every unit's record in unit order, how many were committed before this run)."""
        n_conv = sum(self.estimate(store, u) for u in range(self.n_units))
        ran: set[int] = set()
        for _ in range(3):  # 2 suffice (class docstring); a third would mean counts that change by themselves
            commits = Commits(self.n_units)
            todo = self.todo(store, n_conv, commits)
            if todo:
                execute(todo, commits)
                ran.update(t[0] for t in todo)
            results = commits.ordered()
            true = sum(r.counts.get("conversations", 0) for r in results)
            if true == n_conv or self.cfg.caption_free_ratio == 0:
                return results, self.n_units - len(ran)
            n_conv = true
        raise CommitConflict(f"the units' conversation counts changed between passes ({n_conv}): not deterministic")


def run_pack(cfg: PackConfig) -> list[str]:
    """The whole job; returns the summary lines."""
    from asvr.pipeline.job.ray_job import _ray_init
    from asvr.train.data.packed_build import PackSettings, caption_free_keys, packed_meta, text_tokenizer_hash

    t0 = time.perf_counter()
    meta, keys, where = _code_index(cfg.codes)
    text_hash = text_tokenizer_hash(_text_tokenizer(cfg))
    settings = PackSettings(
        template=cfg.template, max_len=cfg.max_len, image_tokens=cfg.image_tokens, window=cfg.window, seed=cfg.seed
    )
    pmeta = packed_meta(meta, settings, text_hash)
    records = _conversations(cfg)
    n_units = max(1, -(-len(records) // cfg.unit_size))
    run = {
        **pmeta.to_dict(),
        "window": cfg.window,
        "seed": cfg.seed,
        "unit_size": cfg.unit_size,
        "caption_free_ratio": cfg.caption_free_ratio,
    }
    out = PackOutput(cfg.out, run, cfg.overwrite)
    with StopSignals() as stop:
        try:
            out.write_manifest(pmeta.to_dict(), n_units, None)
            task_cfg = {"model": cfg.model, "trust": cfg.trust_remote_code, "settings": asdict(settings)}
            units = UnitPlan(cfg, records, keys, where, run, caption_free_keys)
            execute = partial(_execute, cfg, out.store, meta=meta, task_cfg=task_cfg, text_hash=text_hash)
            results, resumed = units.run(out.store, lambda todo, commits: execute(todo, commits, _ray_init, stop))
            manifest = out.write_manifest(pmeta.to_dict(), n_units, results)
        except Stopped as s:
            raise _stopped(s.signum, cfg, out.store.units_dir) from None
        except Exception:
            if stop.received is not None:  # the handler's Stopped, wrapped by Ray's native wait
                raise _stopped(stop.received, cfg, out.store.units_dir) from None
            raise
        finally:
            out.close()
    return _summary(cfg, manifest["counts"], n_units, resumed, time.perf_counter() - t0)


def _text_tokenizer(cfg: PackConfig):
    """The LLM folder's text tokenizer (local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise OutputError(f"--model {cfg.model}: not a loadable tokenizer folder ({str(e).splitlines()[0]})") from None


def _conversations(cfg: PackConfig) -> list:
    from asvr.train.data.packed_build import read_conversations

    try:
        return read_conversations(cfg.data)
    except ValueError as e:  # the trainer's DataError: one line naming the file
        raise OutputError(str(e)) from None


def _summary(cfg: PackConfig, c: dict, n_units: int, resumed: int, dt: float) -> list[str]:
    return [
        f"{c.get('samples', 0)} samples ({c.get('conversations', 0)} conversations, {c.get('caption_free', 0)} "
        f"caption-free) in {c.get('rows', 0)} rows of <= {cfg.max_len} tokens, {c.get('failed', 0)} failed "
        f"(listed in {Path(cfg.out) / FAILURES})",
        f"{n_units} units ({resumed} already done) in {dt:.1f} s",
    ]


def _stopped(signum: int, cfg: PackConfig, units: Path) -> Stopped:
    """As ``tokenize``: committed units stay (shard + marker, written by their task), the ones in
    flight are abandoned and redone by the rerun."""
    kept = len(list(units.glob("unit-*.json"))) if units.is_dir() else 0
    return Stopped(signum, f"{kept} finished units are kept in {cfg.out}; rerun the same command to resume")


def _execute(cfg, store, todo, commits: Commits, ray_init, signals: StopSignals, *, meta, task_cfg, text_hash) -> None:
    import ray
    from tqdm import tqdm

    stop = ray_init(cfg)
    signals.reinstall()  # ray.init installs its own SIGTERM handler (sys.exit into a native dump)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(_pack_task)
        pending = [
            task.remote(store, u, items, recs, fr, locs, meta, task_cfg, text_hash) for u, items, recs, fr, locs in todo
        ]
        bar = tqdm(total=len(pending), desc="packing units", disable=not cfg.progress)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    commits.add(ray.get(ref))
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(e.cause, (ValueError, OSError)) else None
                    if cause is None:
                        raise
                    raise OutputError(f"{cause}; finished units are kept, rerun after fixing it") from None
                bar.update(1)
        bar.close()
    finally:
        if stop is not None:
            stop()


def run_cli(cfg: PackConfig) -> int:
    """``asvr-pipeline pack``: the job, its summary lines, the folder written."""
    for line in run_pack(cfg):
        print(line)
    print(f"wrote {cfg.out}")
    return 0


__all__ = ["PackConfig", "run_cli", "run_pack"]
