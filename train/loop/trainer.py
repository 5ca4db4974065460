"""The DeepSpeed training loop of ``asvr-train``.

``Trainer(cfg).train()`` reads as: set up distributed -> build data -> build
model (stage, ``--init-from``) -> ``deepspeed.initialize`` -> resume -> loop
of ``train_step`` (gradient accumulation over micro-batches) with metrics,
periodic checkpoints -> final checkpoint, export to ``RUN/final``, loss plot.

Devices: on CUDA, NCCL and bf16 (ZeRO 1-3: DeepSpeed's bf16 engine with fp32
master weights; ZeRO 0, ``--zero auto`` on one process: fp32 weights with bf16
autocast, see ``engine.py``); on CPU, gloo and fp32.  Launched without torchrun/deepspeed the trainer creates a
one-process group itself (127.0.0.1, a free port).  The optimizer is torch's
AdamW passed to DeepSpeed as a client optimizer (FusedAdam needs CUDA and
DeepSpeedCPUAdam compiles a C++ op for ~40 s), unless a ``--deepspeed``
config brings its own ``optimizer`` section.  (DeepSpeed's CPU backend still
compiles its shared-memory communication op once per machine, announced
first: see ``libraries.py``.)  ZeRO-3: the model is built and
``--init-from`` weights loaded *before* ``deepspeed.initialize`` partitions
it (a ~7B model fits in host RAM; ``zero.Init`` for larger ones is not wired),
and the export gathers the partitions with ``zero.GatheredParameters``.
ZeRO-3 also partitions the frozen online encoder: on CPU/gloo its ~200 small
tensors are gathered every step (7 s/step vs 0.5 s with ZeRO-2 on the tiny
test model), so prefer ZeRO-2, or the codes/features inputs, for small runs.

Metrics: the per-step losses stay on the device and are reduced and copied to
the host once per ``--log-every`` steps (every step still gets its row in
metrics.jsonl; step time and tokens/s are the window's mean).  On one H200
(bench/results/gpu_issues_12_13_h200.md) the CLI at ~1.3B bf16 ran at 0.31-0.58
of a bare torch loop under ZeRO-2 (fp32 master weights, ZeRO buckets, its own
syncs in ``engine.step``); issue 26's fast path (stage 0 on one process, the next
batch prefetched, clipping without a host read) is timed against a bare loop of
the same numerics by bench/gpu_train_check.py (its GPU figures: not yet run).

Exactness: on CPU in one process, ``--resume auto`` reproduces the losses of
an uninterrupted run bit for bit (tested): the loader resumes at the next
micro-batch, and model, optimizer, scheduler and RNG states are restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from asvr.train.loop import checkpoint

from asvr.train.loop.preemption import Preempted, SaveClock, StopSignals, gloo_reduce_max
from asvr.train.loop.engine import Stepper, build_engine, choose_stage, compile_blocks, stage_note
from asvr.train.data.prefetch import Prefetcher
from asvr.train.loop.distributed import free_port, init_distributed  # noqa: F401 - importable from here
from asvr.train.loop.run_folder import RunFolderError, check_run_folder, clear_run_folder, lock_run_folder
from asvr.train.config import TrainConfig
from asvr.train.data.dataset import (
    PackedLoader,
    TrainingData,
    assemble_data,
    describe_bad,
    describe_no_placeholder,
    grey_image_codes,
    open_codes,
    write_bad_samples,
)
from asvr.train.export.native import TrainedInputs
from asvr.train.loop.metrics import MetricsLogger, plot_losses, reduce_window
from asvr.train.data.packing import padding_waste, plan_epoch
from asvr.train.data.templates import get_template


class Trainer:
    def __init__(self, cfg: TrainConfig, signals: StopSignals | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.resuming = False
        self.universal = False  # resuming from a universal checkpoint (another number of ranks)
        self.signals = signals or StopSignals()  # installed by the CLI for the whole command
        self.lock = lock_run_folder(self.run_dir) if os.environ.get("RANK", "0") == "0" else None
        try:
            check_run_folder(self.run_dir, cfg.resume, cfg.overwrite)
        except RunFolderError:
            self.close_lock()
            raise
        self.rank, self.world, self.owns_group = init_distributed()
        self.reduce_max = gloo_reduce_max(self.world)  # collective: the ranks' save/stop flags
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.rank == 0:
            if cfg.overwrite and cfg.resume is None:
                clear_run_folder(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

    # ------------------------------------------------------------------ build
    def build_tower(self, tokenizer):
        """The LLM's vision tower (online/features inputs): --vision-tower, else the tokenizer's encoder."""
        from asvr.train.model.vision_input import get_vision_input
        from asvr.train.model.vision_tower import VisionTower, check_tower_grid, open_vision_tower

        cfg = self.cfg
        if cfg.vision_tower is None:
            return VisionTower.from_tokenizer(tokenizer) if get_vision_input(cfg.vision_input).uses_tower else None
        tower = open_vision_tower(cfg.vision_tower, layer=cfg.vision_tower_layer, select=cfg.vision_tower_select)
        check_tower_grid(tower.spec, tokenizer.spec.grid)
        self.log(
            f"vision tower {tower.spec.source} ({tower.encoder_spec.kind}, layer {tower.encoder_spec.feature_layer}"
            f", {tower.select}): {tower.tokens_per_image} x {tower.spec.dim}-d per image"
        )
        return tower.to(self.device)

    def build_data(self, tokenizer, tower, llm_tokenizer) -> tuple[TrainingData, PackedLoader]:
        cfg = self.cfg
        cache = Path(cfg.cache_dir) if cfg.cache_dir else self.run_dir / "cache"
        assert cfg.codes is not None  # TrainConfig.__post_init__: --codes/--data unless --packed
        if self.rank == 0:
            store = open_codes(cfg.codes, tokenizer.spec, cache_dir=cache)
        dist.barrier()
        if self.rank != 0:
            store = open_codes(cfg.codes, tokenizer.spec, cache_dir=cache, write_cache=False)
        dcfg = cfg.data_config(tower.tokens_per_image if tower is not None else None)
        grey = None
        if cfg.text_only_visual_loss == "grey-image":
            grey = grey_image_codes(tokenizer, tokenizer.preprocess_config(store.meta.preprocess).image_size)
        assert cfg.template is not None  # TrainConfig.__post_init__ fills the stage default
        enc = tower.encoder_spec if tower is not None else tokenizer.spec.encoder
        self.inputs = TrainedInputs(  # recorded in the export: what readers of RUN/final default to
            template=cfg.template, preprocess=store.meta.preprocess, image_size=enc.image_size, resample=enc.resample
        )
        data, collate = assemble_data(
            dcfg,
            get_template(cfg.template),
            llm_tokenizer,
            store,
            tower=tower,
            cache_dir=cache,
            primary=self.rank == 0,
            barrier=dist.barrier,
            progress=cfg.progress,
            grey_codes=grey,
        )
        if data.bad and self.rank == 0:
            write_bad_samples(self.run_dir / "bad_samples.jsonl", data.bad)
            print(f"skipping {describe_bad(data.bad)} (all listed in {self.run_dir / 'bad_samples.jsonl'})")
        if data.no_placeholder and self.rank == 0:
            print(describe_no_placeholder(data.no_placeholder))
        loader = PackedLoader(
            data.lengths,
            collate,
            dcfg.packing,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
            num_workers=cfg.num_workers,
        )
        return data, loader

    def build_packed(self, tokenizer, tower, llm_tokenizer):
        """``--packed``: this rank's stream of packed rows (:mod:`asvr.train.data.packed_stream`)."""
        from asvr.train.data.packed_stream import open_packed_loader

        cfg = self.cfg
        loader = open_packed_loader(cfg, tokenizer, tower, llm_tokenizer, rank=self.rank, world=self.world)
        preprocess = loader.corpus.meta.preprocess
        if cfg.text_only_visual_loss == "grey-image":
            size = tokenizer.preprocess_config(preprocess).image_size
            loader.collate.grey_codes = grey_image_codes(tokenizer, size)
        assert cfg.template is not None
        enc = tower.encoder_spec if tower is not None else tokenizer.spec.encoder
        self.inputs = TrainedInputs(
            template=cfg.template, preprocess=preprocess, image_size=enc.image_size, resample=enc.resample
        )
        return (
            loader,
            f"{loader.corpus.n_rows} packed rows in {cfg.packed}, {loader.micro_batches_per_epoch()} micro-batches/epoch/rank",
        )

    def build_model(self, tokenizer, tower):
        cfg = self.cfg
        mcfg = cfg.model_config(tower.spec if cfg.vision_tower is not None else None)
        from asvr.train.model.lvlm import build_model

        torch.manual_seed(cfg.seed)  # same random projector/head on every rank
        model = build_model(mcfg, tokenizer, tower=tower)
        if cfg.init_from and not self.resuming:
            src = checkpoint.load_pretrained(model, cfg.init_from, tokenizer.spec.fingerprint)
            self.log(f"initialised from {src}")
        groups = model.set_stage(cfg.stage)
        return model, groups

    # ------------------------------------------------------------------ run
    def log(self, msg: str) -> None:
        if self.rank == 0 and self.cfg.progress:
            print(msg, flush=True)

    def train(self) -> dict:
        from transformers import AutoTokenizer

        from asvr.tokenizer.model import SemanticTokenizer

        cfg = self.cfg
        auto_tag, why = checkpoint.resume_choice(self.run_dir) if cfg.resume == "auto" else (None, "")
        if why and self.rank == 0:
            print(why, file=sys.stderr, flush=True)  # never silent: step 0, or not the tag `latest` names
        self.resuming = cfg.resume is not None and (cfg.resume != "auto" or auto_tag is not None)
        tokenizer = SemanticTokenizer.load(cfg.tokenizer)
        llm_tokenizer = AutoTokenizer.from_pretrained(
            cfg.model, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        tower = self.build_tower(tokenizer)
        if cfg.packed is not None:  # issue 25: packed shards streamed per rank
            loader, what = self.build_packed(tokenizer, tower, llm_tokenizer)
        else:
            data, loader = self.build_data(tokenizer, tower, llm_tokenizer)
            what = (
                f"{len(data.samples)} samples ({data.n_conversations} conversations, {data.n_caption_free} "
                f"caption-free), {loader.micro_batches_per_epoch()} micro-batches/epoch/rank, padding waste "
                f"{padding_waste(plan_epoch(data.lengths, loader.packing, cfg.seed, 0), data.lengths):.1%}"
            )
        per_epoch = loader.micro_batches_per_epoch() // cfg.grad_accum
        total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))
        tag = auto_tag or cfg.resume if self.resuming else None
        self.stage = choose_stage(cfg, self.world, checkpoint.saved_zero(self.run_dir, tag) if tag else None, tag)
        self.log(f"{what}, {total} steps on {self.world} x {self.device.type}{stage_note(cfg, self.stage)}")

        model, groups = self.build_model(tokenizer, tower)
        self.universal = self.resuming and self.elastic_resume(auto_tag or cfg.resume)
        if cfg.compile:
            self.log(f"torch.compile: {compile_blocks(model)} blocks (compiled at their first step)")
        engine = build_engine(
            cfg,
            self.device,
            model,
            groups,
            total,
            announce=self.rank == 0,
            load_universal=self.universal,
            stage=self.stage,
        )
        step = self.resume(engine, loader, auto_tag)
        if self.rank == 0:
            (self.run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        metrics = MetricsLogger(self.run_dir, self.rank == 0, cfg.tensorboard, resume_step=step)
        stop = total if cfg.stop_after is None else min(total, step + cfg.stop_after)
        with self.signals.deferred():  # a stop signal ends the current step, saves, raises Preempted
            last = self.loop(engine, loader, metrics, step, stop, total)
        metrics.close()
        if cfg.export and stop == total:
            self.export(engine, llm_tokenizer)
        if self.rank == 0:
            plot_losses(self.run_dir, cfg.stage)
        dist.barrier()
        return last

    def elastic_resume(self, tag: str | None) -> bool:
        """True when ``tag`` was saved on another number of ranks: then (``--packed`` only, whose
        loader state is elastic) rank 0 converts it to DeepSpeed's universal form first."""
        saved = checkpoint.saved_world(self.run_dir, tag)
        if saved is None or saved == self.world:
            return False
        assert tag is not None
        if self.cfg.packed is None:
            raise checkpoint.CheckpointError(
                f"--resume: {tag} was saved on {saved} ranks, this run has {self.world}; only --packed "
                "training resumes on another number of ranks (asvr-pipeline pack), else launch "
                f"{saved} ranks"
            )
        if checkpoint.saved_zero(self.run_dir, tag) == 0:
            return False  # --zero 0 saves one replicated state (mp_rank_00_*), which every rank loads
        if self.rank == 0:
            self.log(
                f"{tag} was saved on {saved} ranks: converting it for {self.world} (DeepSpeed universal checkpoint)"
            )
            checkpoint.to_universal(self.run_dir, tag, self.cfg.verbose)
        dist.barrier()
        return True

    def resume(self, engine, loader: PackedLoader, auto_tag: str | None) -> int:
        """The step to start at: the checkpoint's (engine and loader restored) or 0 (seeded)."""
        if not self.resuming:
            torch.manual_seed(self.cfg.seed + self.rank)
            return 0
        client = checkpoint.load(
            engine, self.run_dir, self.rank, auto_tag or self.cfg.resume, universal=self.universal, seed=self.cfg.seed
        )
        assert client is not None  # resuming: a named tag, or "auto" with a latest tag present
        step = int(client["step"])
        loader.load_state_dict(client["loader"])
        self.log(f"resumed from step {step} (epoch {loader.epoch}, micro-batch {loader.position})")
        return step

    def loop(self, engine, loader: PackedLoader, metrics: MetricsLogger, step: int, stop: int, total: int) -> dict:
        """Steps ``step`` .. ``stop`` over ``loader`` (its next micro-batch built in a thread, see
        :mod:`asvr.train.data.prefetch`)."""
        feed = Prefetcher(loader, self.device, enabled=self.cfg.prefetch)
        try:
            return self.steps(engine, feed, metrics, step, stop, total)
        finally:
            feed.close()

    def steps(self, engine, feed: Prefetcher, metrics: MetricsLogger, step: int, stop: int, total: int) -> dict:
        """The loop body of :meth:`loop` over ``feed``'s micro-batches (its state: the consumed ones')."""
        from tqdm import tqdm

        cfg = self.cfg
        stepper = Stepper(engine, cfg, self.stage, self.world)
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"{cfg.stage}",
            disable=self.rank != 0 or not cfg.progress,
            dynamic_ncols=True,
        )
        last: dict = {}
        pending: list[tuple[dict, list[str], torch.Tensor]] = []
        engine.train()
        clock = SaveClock(cfg.save_every, cfg.save_every_minutes, self.signals, self.reduce_max)
        t_window = time.perf_counter()
        while step < stop:
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves at the step's end)
            keys, vec, tokens = self.train_step(stepper, feed)
            step += 1
            pending.append(({"step": step, "tokens": tokens, "lr": lr, "epoch": feed.epoch}, keys, vec))
            bar.update(1)
            due, signum = clock.poll(step)  # --save-every(-minutes), SIGTERM/SIGUSR1: same on every rank
            save = (step == stop and cfg.final_checkpoint) or due
            if save or step == stop or len(pending) >= cfg.log_every:
                # one reduction and one device->host copy for the whole window: the step time is
                # the window's mean (a per-step host clock would need a sync per step)
                records = reduce_window(pending, self.device, cfg.grad_accum * self.world)
                dt = (time.perf_counter() - t_window) / len(pending)
                for record in records:
                    record.update(tokens_per_s=record.pop("tokens") / dt, step_time_s=dt)
                    metrics.log(record)
                last = records[-1]
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}", text=f"{last['loss_text']:.3f}", vis=f"{last['loss_visual']:.3f}"
                )
                pending = []
            if save:
                checkpoint.save(engine, self.run_dir, step, feed.state, self.rank, cfg.keep_checkpoints)
            if signum:
                bar.close()
                raise Preempted(signum, checkpoint.tag_for(step), step)
            if not pending:
                t_window = time.perf_counter()
        bar.close()
        return last

    def train_step(self, stepper: Stepper, feed: Prefetcher) -> tuple[list[str], torch.Tensor, int]:
        """One optimizer step = grad_accum micro-batches.  -> (loss names, their sums over
        the micro-batches as one device tensor, this rank's tokens): nothing is read back
        from the device here (see :func:`metrics.reduce_window`)."""
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for _ in range(self.cfg.grad_accum):
            batch = next(feed)
            tokens += batch.num_tokens  # counted on the host copy: no device sync
            m = stepper(batch.to(self.device, non_blocking=feed.pin))
            for k, v in m.items():
                if k.startswith("loss"):
                    sums[k] = sums.get(k, 0) + v.detach().float()
        keys = sorted(sums)
        return keys, torch.stack([sums[k] for k in keys]), tokens

    def export(self, engine, llm_tokenizer) -> None:
        """RUN/final via asvr.train.export.native (ZeRO-3 partitions gathered first)."""
        import deepspeed

        from asvr.train.export.native import save_exported

        module = engine.module
        params = list(module.parameters())
        zero3 = engine.zero_optimization_stage() == 3
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
        with ctx:
            if self.rank == 0:
                save_exported(module, self.run_dir / "final", llm_tokenizer, self.inputs)
        dist.barrier()
        self.log(f"exported the model to {self.run_dir / 'final'}")

    def close(self) -> None:
        if self.owns_group:
            dist.barrier()
        self.close_lock()

    def close_lock(self) -> None:
        if self.lock is not None:
            self.lock.close()
