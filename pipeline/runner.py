"""Wires discovery -> Ray Data (read+decode tasks -> encode actor pool) -> shard writer.

The driver owns the plan and OUT: workers see plan rows and return codes, the
driver buffers rows per work unit and commits a unit (shard, then marker) as
soon as its last image comes back.  Workers never write, so OUT only needs to
exist on the driver's machine; the inputs must be readable at the same paths
on every node of a cluster (shared filesystem).

Sizing on one machine: each decode task and each CPU encode actor reserves one
CPU; a CPU actor runs torch on ``encode_threads`` threads (default: all CPUs
divided among actors), so with 2 CPUs the actor's threads share the cores with
one decode task.  On the embedded default (EfficientNet-Lite0) decode+resize
of a 96x72 JPEG costs ~1/50 of its encode, so the encoder is the bottleneck
and the decode task is mostly idle; with GPUs there is one actor per GPU
(``num_gpus=1``) and every other CPU decodes.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from asvr.tokenizer.artifact import load_artifact
from asvr.tokenizer.preprocess import DEFAULT_MAX_PIXELS, PREPROCESS_MODES, PreprocessConfig

from asvr.tokenizer.shards import ShardMeta
from asvr.tokenizer.signals import STOP_SIGNALS, StopSignals, Stopped
from .sources import SourceOptions, discover
from .stages import Encoder, ReadDecode, TokenizerBuilder
from .writer import COUNTS, OutputDir, UnitResult, units_hash

DECODE_TASK_MEMORY = 512 * 2**20


@dataclass(kw_only=True)
class PipelineConfig:
    inputs: list[str]
    """Image folders, webdataset tars (brace patterns), Parquet files, LLaVA JSON files."""
    tokenizer: str
    """Tokenizer artifact directory (asvr-tokenizer train / import-dualtoken)."""
    out: str
    """Output directory: shards, manifest.json, failures.parquet."""
    sources: SourceOptions = field(default_factory=SourceOptions)
    format: str = "parquet"
    """parquet | webdataset."""
    preprocess: str | None = None
    """square | pad; default: the tokenizer's mode."""
    batch_size: int = 32
    """Images per encode call."""
    shard_size: int = 1000
    """Input images per work unit (and so at most rows per shard): the resume granularity."""
    fast_decode: bool = False
    """PIL JPEG draft decoding: ~2x faster on large photos, pixels (so codes) differ."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels fail as decompression bombs (PIL refuses above 2x its own limit regardless)."""
    encoder_dtype: str = "float32"
    search_dtype: str | None = None
    """RVQ candidate search (asvr.tokenizer.quantizer.SEARCH_DTYPES; codes are identical for all, only speed
    moves; default: the tokenizer's choice for the device)."""
    encode_actors: int = 0
    """Encode actors (0: one per GPU, else one per 8 CPUs, at least 1)."""
    encode_threads: int = 0
    """torch threads per CPU actor (0: CPUs / actors)."""
    ray_address: str | None = None
    num_cpus: int | None = None
    """CPUs for a local Ray (default: all)."""
    overwrite: bool = False
    progress: bool = True
    verbose: bool = False
    """Let Ray print its own warnings (see asvr.pipeline.cli.quiet_ray)."""

    def __post_init__(self):
        if self.format not in ("parquet", "webdataset"):
            raise ValueError(f"--format must be parquet or webdataset, got {self.format!r}")
        if self.preprocess is not None and self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"--preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("--batch-size and --shard-size must be >= 1")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if self.encoder_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--encoder-dtype must be float32 or bfloat16, got {self.encoder_dtype!r}")
        from asvr.tokenizer.quantizer import SEARCH_DTYPES

        if self.search_dtype is not None and self.search_dtype not in SEARCH_DTYPES:
            raise ValueError(f"--search-dtype must be one of {', '.join(SEARCH_DTYPES)}, got {self.search_dtype!r}")


@dataclass
class RunSummary:
    counts: dict
    units: int
    units_skipped: int
    shards: int
    wall_s: float
    images_processed: int
    """Images that went through Ray in this run (not those of skipped units)."""
    seconds: dict
    """Summed worker seconds per stage: read, decode, encode; driver seconds: write."""

    @property
    def images_per_s(self) -> float:
        return self.images_processed / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        c = self.counts
        split = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        ignored = f"  (ignored {c['ignored']} non-image files)" if c.get("ignored") else ""
        return [
            f"seen {c['seen']}  encoded {c['encoded']}  failed {c['failed']}  duplicate {c['duplicate']}{ignored}",
            f"units {self.units} ({self.units_skipped} already done), shards {self.shards}",
            f"{self.images_processed} images in {self.wall_s:.1f}s = {self.images_per_s:.1f} img/s",
            f"time: {split} (read/decode/encode summed over workers)",
        ]


# --------------------------------------------------------------------------- helpers
def _ray_init(cfg: PipelineConfig):
    """Start (or join) Ray; returns a function that stops what this call started (None if it joined).

    Without ``--ray-address`` / ``RAY_ADDRESS`` the job always starts its own
    local Ray (``address="local"``): a bare ``ray.init()`` would instead attach
    to a cluster named by a ``ray_current_cluster`` file that ``ray start`` left
    in Ray's temp folder, another job's or a dead one, and then fail on
    ``num_cpus``.  That local Ray is tied to this driver, ``kill -9`` included
    (:mod:`asvr.pipeline.ray_reaper`).
    """
    import ray

    from .ray_reaper import Reaper

    if ray.is_initialized():
        return None
    kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")  # Ray's own convention for joining a cluster
    if address:
        ray.init(address=address, **kw)
        return ray.shutdown
    reaper = Reaper()
    try:
        with reaper.marked():
            ctx = ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), **kw)
        reaper.watch_session(ctx.address_info.get("session_dir"))
    except BaseException:
        reaper.close()
        raise

    def stop():
        ray.shutdown()
        reaper.close()

    return stop


def _quiet_ray_data(verbose: bool = False):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images, not blocks
    ctx.enable_auto_log_stats = False
    ctx.execution_options.verbose_progress = False
    # ERROR: Ray Data warns "Progress bars disabled" when we turn its bars off for ours
    logging.getLogger("ray.data").setLevel(logging.WARNING if verbose else logging.ERROR)


def _resources(cfg: PipelineConfig) -> tuple[int, dict, TokenizerBuilder]:
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus:
        actors = cfg.encode_actors or gpus
        remote = {"num_gpus": 1, "num_cpus": 1}
        builder = TokenizerBuilder(cfg.tokenizer, "cuda", 0, cfg.encoder_dtype, cfg.search_dtype)
    else:
        actors = cfg.encode_actors or max(1, cpus // 8)
        threads = cfg.encode_threads or max(1, cpus // actors)
        remote = {"num_cpus": 1}
        builder = TokenizerBuilder(cfg.tokenizer, "cpu", threads, cfg.encoder_dtype, cfg.search_dtype)
    return actors, remote, builder


def _blocks(plan: pa.Table, idx: np.ndarray, batch_size: int, cpus: int) -> list[pa.Table]:
    """Pending plan rows as blocks: big enough to amortise a task, small enough to keep every CPU busy."""
    rows = plan.take(pa.array(idx)).append_column("idx", pa.array(idx, pa.int64()))
    n = rows.num_rows
    size = max(batch_size, min(1024, math.ceil(n / (4 * cpus))))
    return [rows.slice(i, size) for i in range(0, n, size)]


# --------------------------------------------------------------------------- run
class _UnitBuffer:
    def __init__(self, unit: int, items: np.ndarray, waiting: int):
        self.unit, self.items, self.waiting = unit, items, waiting
        self.rows: dict[int, tuple] = {}
        self.failures: dict[int, tuple] = {}
        self.duplicates = 0


def run_pipeline(cfg: PipelineConfig) -> RunSummary:
    """The whole job.  SIGTERM / SIGUSR1 stop it cleanly (:mod:`asvr.tokenizer.signals`): a unit
    being committed is finished, units in flight are abandoned, Ray is shut down, and
    :class:`Stopped` says how many units are kept; the rerun resumes from them."""
    with StopSignals() as stop:
        try:
            return _run_pipeline(cfg, stop)
        except Stopped as e:
            e.detail = e.detail or "nothing was written yet; rerun the same command to start"
            raise


def _run_pipeline(cfg: PipelineConfig, stop: StopSignals) -> RunSummary:
    t_start = time.perf_counter()
    spec, _ = load_artifact(cfg.tokenizer)  # a bad tokenizer dir fails here, before Ray starts
    mode = cfg.preprocess or spec.preprocess
    e = spec.encoder
    pcfg = PreprocessConfig(
        image_size=e.image_size,
        mean=tuple(e.mean),
        std=tuple(e.std),
        resample=e.resample,
        mode=mode,
        max_pixels=cfg.max_pixels,
        fast_decode=cfg.fast_decode,
        max_decode_bytes=DECODE_TASK_MEMORY,  # refused before decoding, not killed by the OOM killer
    )
    meta = ShardMeta.from_spec(spec, mode)
    run_config = {
        "fingerprint": spec.fingerprint,
        "preprocess": mode,
        "format": cfg.format,
        "shard_size": cfg.shard_size,
        "fast_decode": cfg.fast_decode,
        "max_pixels": cfg.max_pixels,
        "encoder_dtype": cfg.encoder_dtype,
    }

    plan, inputs = discover(cfg.inputs, cfg.sources)
    out = OutputDir(cfg.out, run_config, overwrite=cfg.overwrite)
    try:
        return _run(cfg, pcfg, meta, plan, inputs, out, t_start, stop)
    finally:
        out.close()


def _run(cfg, pcfg, meta, plan, inputs, out: OutputDir, t_start, stop: StopSignals) -> RunSummary:
    n = plan.num_rows
    keys = plan.column("key").to_pylist()
    sources = plan.column("source").to_pylist()
    n_units = math.ceil(n / cfg.shard_size)
    # ignored: files / tar members that are not input images; listed, never sent to Ray, not ``seen``
    ignored = np.asarray([k == "ignored" for k in plan.column("kind").to_pylist()], bool)
    why_ignored = plan.column("error").to_pylist()

    # duplicates: a key seen earlier in plan order
    first: dict[str, int] = {}
    dup_of = np.full(n, -1, np.int64)
    for i, k in enumerate(keys):
        if ignored[i]:
            continue
        j = first.setdefault(k, i)
        if j != i:
            dup_of[i] = j

    results: dict[int, UnitResult] = {}
    buffers: dict[int, _UnitBuffer] = {}
    pending: list[int] = []
    unit_hash = {}
    for u in range(n_units):
        lo, hi = u * cfg.shard_size, min(n, (u + 1) * cfg.shard_size)
        unit_hash[u] = units_hash(keys[lo:hi], sources[lo:hi])
        r = out.done(u, unit_hash[u])
        if r is not None:
            results[u] = r
            continue
        items = np.arange(lo, hi)
        todo = items[(dup_of[lo:hi] < 0) & ~ignored[lo:hi]]
        buffers[u] = _UnitBuffer(u, items, len(todo))
        pending.extend(todo.tolist())
    skipped = len(results)
    out.write_manifest(inputs, None, n_units)

    seconds = {"read": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0}

    def commit(buf: _UnitBuffer):
        with stop.deferred():  # a stop signal lets the unit's shard and marker finish
            _commit(buf)

    def _commit(buf: _UnitBuffer):
        t0 = time.perf_counter()
        rows: dict[str, list[Any]] = {k: [] for k in ("key", "codes", "sha256", "width", "height", "caption")}
        failures = []
        for i in buf.items.tolist():
            if ignored[i]:
                failures.append({"key": keys[i], "source": sources[i], "stage": "ignored", "error": why_ignored[i]})
            elif dup_of[i] >= 0:
                failures.append(
                    {
                        "key": keys[i],
                        "source": sources[i],
                        "stage": "duplicate",
                        "error": f"duplicate key, first seen at {sources[dup_of[i]]}",
                    }
                )
            elif i in buf.failures:
                stage, err = buf.failures[i]
                failures.append({"key": keys[i], "source": sources[i], "stage": stage, "error": err})
            else:
                codes, sha, w, h, cap = buf.rows[i]
                for name, v in zip(
                    ("key", "codes", "sha256", "width", "height", "caption"), (keys[i], codes, sha, w, h, cap)
                ):
                    rows[name].append(v)
        ndup = int((dup_of[buf.items] >= 0).sum())
        nign = int(ignored[buf.items].sum())
        counts = {
            "seen": len(buf.items) - nign,
            "encoded": len(rows["key"]),
            "failed": len(failures) - ndup - nign,
            "duplicate": ndup,
            "ignored": nign,
        }
        results[buf.unit] = out.commit_unit(buf.unit, unit_hash[buf.unit], meta, rows, failures, counts)
        del buffers[buf.unit]
        seconds["write"] += time.perf_counter() - t0

    processed = 0
    try:
        for buf in [b for b in buffers.values() if b.waiting == 0]:
            commit(buf)
        if pending:
            processed = _execute(
                cfg, pcfg, plan, np.asarray(pending, np.int64), buffers, commit, seconds, n, skipped, stop
            )
    except Stopped as e:
        kept = sorted(results)
        e.detail = (
            f"{len(kept)} of {n_units} units are written to {cfg.out} ({len(buffers)} in flight abandoned); "
            "rerun the same command to resume"
        )
        raise

    final = [results[u] for u in range(n_units)]
    out.write_manifest(inputs, final, n_units)
    manifest_counts = {k: sum(r.counts.get(k, 0) for r in final) for k in COUNTS}
    return RunSummary(
        manifest_counts,
        n_units,
        skipped,
        sum(1 for r in final if r.shard),
        time.perf_counter() - t_start,
        processed,
        seconds,
    )


def _execute(cfg, pcfg, plan, pending, buffers, commit, seconds, n_total, skipped, stop: StopSignals) -> int:
    import ray
    import ray.data
    from tqdm import tqdm

    try:
        stop_ray = _ray_init(cfg)
    except SystemExit as e:  # ray.init's own SIGTERM handler (sys.exit) fired while Ray was starting
        if e.code in STOP_SIGNALS:
            stop.received = int(e.code)  # type: ignore[arg-type]
            raise Stopped(int(e.code)) from None  # type: ignore[arg-type]
        raise
    stop.reinstall()  # ray.init replaced our SIGTERM handler with its sys.exit
    owns_ray = stop_ray is not None and not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))  # a local Ray we started
    try:
        _quiet_ray_data(cfg.verbose)
        actors, remote, builder = _resources(cfg)
        if owns_ray:
            # A local Ray: no node to fail over to, and the encode is deterministic, so Ray Data's
            # default (restart a dead actor forever, retry its tasks forever) would repeat a crash
            # without end; failing lets the rerun resume instead.  It also spares the driver's
            # error-level core_worker line about restartable actors with arguments in the object
            # store, printed over the progress bar.
            remote = {**remote, "max_restarts": 0}
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = _blocks(plan, pending, cfg.batch_size, cpus)
        ds: ray.data.Dataset = ray.data.from_arrow(blocks)
        # Decode tasks reserve memory (a 50-Mpixel JPEG peaks near 300 MB while decoding).  Their resources
        # then differ from the encode actor's, which also keeps Ray Data from fusing decode into the actor:
        # decode runs in its own processes and overlaps encode.
        ds = ds.map_batches(
            ReadDecode(pcfg), batch_size=None, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY
        )
        with warnings.catch_warnings():
            # max_restarts has no named parameter yet; Ray Data's own docs pass it this way
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                Encoder,
                fn_constructor_kwargs={"builder": builder},
                batch_size=cfg.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                **remote,
            )
        unit_of = lambda i: i // cfg.shard_size  # noqa: E731
        done_before = n_total - len(pending)
        bar = tqdm(
            total=n_total,
            initial=done_before,
            unit="img",
            disable=not cfg.progress,
            smoothing=0.1,
            dynamic_ncols=True,
            desc="tokenize",
        )
        processed = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            seconds["read"] += float(batch["t_read"].sum())
            seconds["decode"] += float(batch["t_decode"].sum())
            seconds["encode"] += float(batch["t_encode"].sum())
            touched = set()
            for j, i in enumerate(batch["idx"].tolist()):
                buf = buffers[unit_of(i)]
                if batch["ok"][j]:
                    cap = batch["caption"][j]  # Arrow may turn an all-None column into NaN floats
                    buf.rows[i] = (
                        batch["codes"][j],
                        batch["sha256"][j],
                        int(batch["width"][j]),
                        int(batch["height"][j]),
                        cap if isinstance(cap, str) else None,
                    )
                else:
                    buf.failures[i] = (batch["stage"][j], batch["error"][j])
                buf.waiting -= 1
                touched.add(buf.unit)
            for u in sorted(touched):
                if buffers[u].waiting == 0:
                    commit(buffers[u])
            processed += len(batch["idx"])
            bar.update(len(batch["idx"]))
        bar.close()
        return processed
    finally:
        if stop_ray is not None:
            stop_ray()
