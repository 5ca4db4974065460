"""Wires listing (Ray tasks) -> Ray Data (unit read+decode tasks -> encode+write actor pool) -> manifest.

The driver owns OUT's lock, the run config and the manifest, and nothing per image: listing jobs
run in Ray tasks and write the plan to ``OUT/.plan`` (:mod:`asvr.pipeline.job.plan`), a decode task
turns a unit number into that unit's decoded images, and the encode actor that encoded a unit
writes its shard and marker itself (:mod:`asvr.pipeline.job.unit_stages`, :mod:`asvr.pipeline.output.commit`).
The driver receives one commit record per unit and writes ``manifest.json`` and
``failures.parquet`` at the end.  OUT and the inputs must be on storage every node sees at the
same path (a shared filesystem in a cluster; local disk on one machine).

Sizing on one machine: each decode task and each CPU encode actor reserves one
CPU; a CPU actor runs torch on ``encode_threads`` threads (default: all CPUs
divided among actors), so with 2 CPUs the actor's threads share the cores with
one decode task.  On the embedded default (EfficientNet-Lite0) decode+resize
of a 96x72 JPEG costs ~1/50 of its encode, so the encoder is the bottleneck
and the decode task is mostly idle; with GPUs there is one actor per GPU
(``num_gpus=1``) and every other CPU decodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


from asvr.tokenizer.artifact import load_artifact
from asvr.tokenizer.preprocess import DEFAULT_MAX_PIXELS, PREPROCESS_MODES, PreprocessConfig, preprocess_mode

from asvr.core.shards import ShardMeta

from asvr.core.signals import StopSignals, Stopped

from asvr.pipeline.output.commit import CommitRecord, Commits, OutputError
from asvr.pipeline.job.plan import build_plan, listing_jobs
from asvr.pipeline.inputs.sources import SourceOptions
from asvr.pipeline.job.ray_job import (  # noqa: F401 - DECODE_TASK_MEMORY: importable from here
    DECODE_TASK_MEMORY,
    LazyRay,
    UnitJob,
    resources,
    stream_units,
)
from asvr.pipeline.job.unit_stages import UnitReadDecode
from asvr.pipeline.output.writer import COUNTS, PLAN_DIR, OutputDir


def _search_dtypes() -> tuple[str, ...]:
    from asvr.tokenizer.rvq.quantizer import SEARCH_DTYPES

    return SEARCH_DTYPES


INPUTS, ENCODE, RAY = "inputs", "encoding", "Ray"


@dataclass(kw_only=True)
class PipelineConfig:
    """One tokenize job; every field is an ``asvr-pipeline tokenize`` option (``asvr.core.config_cli``)."""

    inputs: list[str] = field(metadata={"positional": True, "metavar": "INPUT"})
    """Image folder, .tar (brace pattern), .parquet, LLaVA .json, Hugging Face datasets folder."""
    tokenizer: str
    """Tokenizer artifact directory (asvr-tokenizer train / import-dualtoken)."""
    out: str
    """Output directory: shards, manifest.json, failures.parquet."""
    sources: SourceOptions = field(default_factory=SourceOptions, metadata={"prefix": ""})
    format: str = field(default="parquet", metadata={"choices": ("parquet", "webdataset")})
    """Shard format."""
    preprocess: str | None = field(default=None, metadata={"choices": PREPROCESS_MODES, "group": INPUTS})
    """Resize to square, or pad to square with the mean colour first (default: the tokenizer's)."""
    fast_decode: bool = field(default=False, metadata={"group": INPUTS})
    """JPEG draft decoding: ~2x faster on large photos, but pixels and so codes differ."""
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"group": INPUTS})
    """Larger images fail as decompression bombs (PIL refuses above 2x its own limit regardless)."""
    batch_size: int = field(default=32, metadata={"group": ENCODE})
    """Images per encode call."""
    shard_size: int = field(default=1000, metadata={"group": ENCODE})
    """Input images per shard (at most rows per shard); also the unit of resume."""
    encoder_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16"), "group": ENCODE})
    """Encoder precision (bfloat16 autocast is faster on GPUs; features change)."""
    search_dtype: str | None = field(default=None, metadata={"choices": _search_dtypes, "group": ENCODE})
    """RVQ candidate search precision; codes are identical for all, only speed moves (default: fused-bf16x3 on a
    GPU with triton installed, else float32; fused-* need triton)."""
    compile_encoder: bool = field(default=False, metadata={"group": ENCODE})
    """torch.compile the encoder once per actor (one batch shape; pays off on long GPU jobs)."""
    encode_chunks: int = field(default=1, metadata={"group": ENCODE, "show_default": False})
    """Pieces per batch: on a GPU the encoder runs the next piece while the RVQ quantizes this one (CUDA
    streams)."""
    encode_actors: int = field(default=0, metadata={"group": RAY, "show_default": False})
    """Encode actors (default: one per GPU, or 1 per 8 CPUs)."""
    encode_threads: int = field(default=0, metadata={"group": RAY, "show_default": False})
    """torch threads per CPU actor (default: CPUs/actors)."""
    num_cpus: int | None = field(default=None, metadata={"group": RAY})
    """CPUs of the local Ray instance (default: all)."""
    ray_address: str | None = field(default=None, metadata={"group": RAY})
    """Join this Ray cluster (or set RAY_ADDRESS; the workers write the shards, so INPUTs and --out must be at
    the same path on every node); default: start a fresh local Ray."""
    overwrite: bool = False
    """Replace an OUT written with other settings."""
    progress: bool = field(default=True, metadata={"flag": "--no-progress"})
    """(--no-progress) no progress bar."""
    verbose: bool = field(default=False, metadata={"short": "-v"})
    """Also show Ray's own warnings and log lines (see asvr.pipeline.cli.quiet_ray)."""

    def __post_init__(self):
        if self.format not in ("parquet", "webdataset"):
            raise ValueError(f"--format must be parquet or webdataset, got {self.format!r}")
        if self.preprocess is not None:
            preprocess_mode(self.preprocess)
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("--batch-size and --shard-size must be >= 1")
        if self.encode_chunks < 1:
            raise ValueError("--encode-chunks must be >= 1")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if self.encoder_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--encoder-dtype must be float32 or bfloat16, got {self.encoder_dtype!r}")
        from asvr.tokenizer.rvq.quantizer import SEARCH_DTYPES

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
    """Driver wall seconds of the listing; summed worker seconds per stage: read, decode, encode, write."""

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
            f"time: {split} (list: driver wall; read/decode/encode/write summed over workers)",
        ]


# --------------------------------------------------------------------------- run
def run_pipeline(cfg: PipelineConfig) -> RunSummary:
    t_start = time.perf_counter()
    spec, _ = load_artifact(cfg.tokenizer)  # a bad tokenizer dir fails here, before Ray starts
    mode = cfg.preprocess or spec.preprocess
    pcfg = PreprocessConfig.for_encoder(
        spec.encoder,
        mode,
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
        # compiled kernels round features differently from eager ones: a resume must not mix them
        # (the key only when set, so folders written before it existed still resume)
        **({"compile_encoder": True} if cfg.compile_encoder else {}),
    }

    jobs, inputs = listing_jobs(cfg.inputs, cfg.sources)  # a missing INPUT fails here, before Ray starts
    out = OutputDir(cfg.out, run_config, overwrite=cfg.overwrite)
    with StopSignals() as stop:
        ray_ = LazyRay(cfg, stop)
        try:
            return _run(cfg, pcfg, meta, jobs, inputs, out, t_start, ray_)
        except Stopped as s:
            raise _stopped(s.signum, out, cfg) from None
        except Exception as err:  # noqa: BLE001 - a worker's one-line error, unwrapped from Ray's
            if stop.received is not None:
                # the handler's Stopped raised inside Ray's native wait comes back as a SystemError
                # ("returned a result with an exception set") or whatever Ray wraps it in
                raise _stopped(stop.received, out, cfg) from None
            raise _user_error(err) from None
        finally:
            ray_.stop()
            out.close()


def _stopped(signum: int, out: OutputDir, cfg: PipelineConfig) -> Stopped:
    """Each unit's shard and marker are written by its worker atomically; what was in flight is
    abandoned (its temp files are swept by the rerun), so the rerun resumes from the markers."""
    kept = len(list(out.units_dir.glob("unit-*.json"))) if out.units_dir.is_dir() else 0
    return Stopped(signum, f"{kept} finished units are kept in {cfg.out}; rerun the same command to resume")


def _user_error(err: Exception) -> Exception:
    """The project error (bad input, a failed write) a Ray task raised, else ``err`` itself: Ray
    wraps a worker's exception (``RayTaskError``, Ray Data's ``UserCodeException``) with its
    traceback in the message, which would reach the user as a traceback instead of one line."""
    from asvr.core.errors import TokenizerError
    from asvr.core.shards import ShardError

    from asvr.pipeline.inputs.sources import SourceError

    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the worker's exception, unpickled
        if cause is None and isinstance(e, (SourceError, OutputError, ShardError, TokenizerError)):
            return e
        todo += [cause, e.__cause__, e.__context__]
    return err


def _run(cfg, pcfg, meta, jobs, inputs, out: OutputDir, t_start, ray_: LazyRay) -> RunSummary:
    from tqdm import tqdm

    t_list = time.perf_counter()
    if not out.resuming:
        # written before the listing, so a run killed while listing is resumed, listing included
        out.write_manifest(inputs, None, 0)
    with tqdm(total=len(jobs), unit="input", disable=not cfg.progress, desc="list", dynamic_ncols=True) as bar:
        in_process = len(jobs) <= 1 and not ray_.joining
        plan = build_plan(
            jobs, cfg.sources, out.out / PLAN_DIR, out.resuming, None if in_process else ray_.ensure, bar.update
        )
    n = plan.total
    n_units = math.ceil(n / cfg.shard_size)
    out.write_manifest(inputs, None, n_units)
    seconds = {"list": time.perf_counter() - t_list, "read": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0}
    commits = Commits(n_units)
    processed = skipped = 0
    if n_units:
        ray_.ensure()
        processed, skipped = _execute(cfg, pcfg, meta, plan, out, commits, seconds, ray_.owned)
    final = commits.ordered()
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


def _execute(cfg, pcfg, meta, plan, out: OutputDir, commits: Commits, seconds, owns_ray) -> tuple[int, int]:
    """Every unit through Ray Data (in a coordinator task); the driver only keeps each unit's record."""
    import ray
    from tqdm import tqdm

    actors, remote, builder = resources(cfg)
    if owns_ray:
        # A local Ray: no node to fail over to, and the encode is deterministic, so Ray Data's
        # default (restart a dead actor forever, retry its tasks forever) would repeat a crash
        # without end; failing lets the rerun resume instead.  It also spares the driver's
        # error-level core_worker line about restartable actors with arguments in the object
        # store, printed over the progress bar.  Joining a cluster keeps Ray's retries: a block
        # redone after a worker died rewrites the same shard (commit.py).
        remote = {**remote, "max_restarts": 0}
    job = UnitJob(
        decode=UnitReadDecode(pcfg, plan.folder, plan.starts(), cfg.shard_size, out.store, plan.duplicates > 0),
        encode_kwargs={
            "builder": builder,
            "store": out.store,
            "fmt": cfg.format,
            "meta": meta,
            "batch_size": cfg.batch_size,
        },
        actors=actors,
        remote=remote,
        n_units=commits.n_units,
        verbose=cfg.verbose,
    )
    # num_cpus=0: the coordinator schedules, it does not take a CPU from decode or encode
    coordinator = ray.remote(num_cpus=0, max_retries=0)(stream_units).options(num_returns="streaming")
    bar = tqdm(total=plan.total, unit="img", disable=not cfg.progress, smoothing=0.1, dynamic_ncols=True)
    bar.set_description("tokenize")
    processed = skipped = 0
    # num_returns="streaming" gives an ObjectRefGenerator; Ray's stubs type .remote() as one ObjectRef
    for ref in coordinator.remote(job):  # type: ignore[attr-defined]
        batch = ray.get(ref)
        for k in ("read", "decode", "encode", "write"):
            seconds[k] += float(batch[f"t_{k}"].sum())
        for rec_json, images, was_done in zip(batch["record"], batch["images"], batch["skipped"]):
            rec = CommitRecord.from_json(rec_json)
            if commits.add(rec):
                skipped += bool(was_done)
                processed += int(images)
                bar.update(sum(rec.counts.get(k, 0) for k in ("seen", "ignored")))
    bar.close()
    return processed, skipped
