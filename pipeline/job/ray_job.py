"""The Ray side of one ``asvr-pipeline`` run (:mod:`asvr.pipeline.job.runner` is the driver):
start or join Ray (a local Ray is tied to the driver), size the encode actors to the cluster,
and the Ray Data pipeline (unit read+decode tasks -> encode+write actor pool) that a coordinator
task runs.  Split from ``runner.py`` (issue 21: files under 400 lines).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from asvr.core.signals import StopSignals

from asvr.pipeline.job.stages import TokenizerBuilder
from asvr.pipeline.job.unit_stages import UnitEncodeWriter, UnitReadDecode

if TYPE_CHECKING:
    from asvr.pipeline.job.runner import PipelineConfig

DECODE_TASK_MEMORY = 512 * 2**20


def _ray_init(cfg: PipelineConfig):
    """Start (or join) Ray; returns a function that stops what this call started (None if it joined).

    Without ``--ray-address`` / ``RAY_ADDRESS`` the job always starts its own
    local Ray (``address="local"``): a bare ``ray.init()`` would instead attach
    to a cluster named by a ``ray_current_cluster`` file that ``ray start`` left
    in Ray's temp folder, another job's or a dead one, and then fail on
    ``num_cpus``.  That local Ray is tied to this driver, ``kill -9`` included
    (:mod:`asvr.pipeline.job.ray_reaper`).
    """
    import ray

    from asvr.pipeline.job.ray_reaper import Reaper

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
            ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), **kw)
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


def resources(cfg: PipelineConfig) -> tuple[int, dict, TokenizerBuilder]:
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus:
        actors = cfg.encode_actors or gpus
        remote = {"num_gpus": 1, "num_cpus": 1}
        builder = TokenizerBuilder(
            cfg.tokenizer, "cuda", 0, cfg.encoder_dtype, cfg.search_dtype, cfg.compile_encoder, cfg.encode_chunks
        )
    else:
        actors = cfg.encode_actors or max(1, cpus // 8)
        threads = cfg.encode_threads or max(1, cpus // actors)
        remote = {"num_cpus": 1}
        builder = TokenizerBuilder(
            cfg.tokenizer, "cpu", threads, cfg.encoder_dtype, cfg.search_dtype, cfg.compile_encoder, cfg.encode_chunks
        )
    return actors, remote, builder


class LazyRay:
    """Ray, started (or joined) on first use: a run that lists one input in-process and finds
    nothing to encode (an empty folder, a finished OUT of one input) never starts it."""

    def __init__(self, cfg: PipelineConfig, stop: StopSignals | None = None):
        self.cfg = cfg
        self.signals = stop
        self.joining = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        self._stop = None
        self.started = False

    def ensure(self) -> None:
        if not self.started:
            self._stop = _ray_init(self.cfg)
            self.started = True
            if self.signals is not None:
                self.signals.reinstall()  # ray.init installs its own SIGTERM handler (sys.exit into a native dump)

    @property
    def owned(self) -> bool:
        """A local Ray this run started (not a cluster it joined)."""
        return self._stop is not None and not self.joining

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


@dataclass(frozen=True)
class UnitJob:
    """Everything the coordinator task needs to run the Ray Data pipeline (pickles small)."""

    decode: UnitReadDecode
    encode_kwargs: dict
    actors: int
    remote: dict
    n_units: int
    verbose: bool


def _actor_pool(size: int):
    """The encode actors' pool, its UDF run on the actor's main thread.

    By default Ray Data (2.60) runs an actor's UDF on a one-thread ``ThreadPoolExecutor`` so that
    batching overlaps it.  torch's intra-op (OpenMP) threads are slower under such a thread: on 2
    cores the CPU encode of 1000 54-px images took 5.1-5.4 s there vs 3.7 s on a plain actor's main
    thread, for the same ~7.5 CPU-s (1.5 of 2 cores busy; bench/results/
    pipeline_cluster_commit_abab_cpu_2core.txt).  A whole unit is one call
    and one block, so there is no batching to overlap: ``enable_true_multi_threading`` (with one call
    at a time, Ray's default ``max_concurrency=1``) runs it on the main thread.  Older Ray (< the
    parameter) keeps its default."""
    import inspect

    import ray.data

    if "enable_true_multi_threading" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        return ray.data.ActorPoolStrategy(size=size, enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(size=size)


def stream_units(job: UnitJob) -> Iterator[dict]:
    """The Ray Data pipeline, run in a Ray task (the coordinator), yielding one small batch of
    commit records per output block.  Ray Data's streaming executor (task scheduling, backpressure,
    its polling loop: ~3.5% of a core on the 2-core machine, issue 28's bench) runs there, not in
    the driver, which only receives the records."""
    import ray.data

    _quiet_ray_data(job.verbose)
    ctx = ray.data.DataContext.get_current()  # this task's own context, not the driver's
    ctx.target_max_block_size = None  # one unit = one block, never split (unit_stages.py)
    ds = ray.data.range(job.n_units, override_num_blocks=job.n_units)
    # Decode tasks reserve memory (a 50-Mpixel JPEG peaks near 300 MB while decoding).  Their resources
    # then differ from the encode actor's, which also keeps Ray Data from fusing decode into the actor:
    # decode runs in its own processes and overlaps encode.
    ds = ds.map_batches(job.decode, batch_size=None, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray Data's own docs pass it this way
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            UnitEncodeWriter,
            fn_constructor_kwargs=job.encode_kwargs,
            batch_size=None,
            batch_format="numpy",
            compute=_actor_pool(job.actors),
            **job.remote,
        )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        yield {k: batch[k] for k in ("record", "images", "skipped", "t_read", "t_decode", "t_encode", "t_write")}
