"""The DeepSpeed engine of ``asvr-train``: its config from the command's options (a
``--deepspeed`` file, else ZeRO ``--zero``; bf16 on CUDA, fp32 on CPU) and torch's AdamW with a
cosine schedule after a linear warmup, unless the config brings its own optimizer / scheduler.
Split from ``trainer.py`` (issue 21): the trainer says *when* the engine is built, this module
*how*.

The fast path (issue 26), ``--zero 0`` (``--zero auto`` on one process): DeepSpeed's bf16 mode
is off; the module keeps its fp32 weights (the master copy), the forward runs under DeepSpeed's
``torch_autocast`` (bf16 on CUDA; fp32 on CPU, as every stage there), the client torch
``AdamW(fused=True)`` (``foreach`` on CPU) steps them directly: no BF16_Optimizer or ZeRO
flat buffers and copies.  Gradient clipping is :class:`Stepper`'s
``clip_grad_norm_(foreach=True)`` (DeepSpeed's own clip is off there): its norm stays a device
tensor and is not read back (nor logged).  On one process the backward runs inside
``engine.no_sync()``: DeepSpeed would otherwise flatten every gradient into a bucket and
all-reduce it with itself.  Numerics against ZeRO-2 on CPU: tests/test_train_fast_path_26.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from asvr.train import libraries
from asvr.train.config import TrainConfig
from asvr.train.loop.checkpoint import CheckpointError
from asvr.train.model.visual_head import DepthLayer


def cosine_with_warmup(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def zero_stage(cfg: TrainConfig, world: int, saved: int | None = None) -> int:
    """The ZeRO stage of this run: ``--zero`` as given, or for ``auto`` the resumed checkpoint's
    stage (``saved``: its optimizer state is stage-specific), else 0 on one process and 2 on
    several (``TrainConfig.zero``'s help says why)."""
    if cfg.zero != "auto":
        return int(cfg.zero)
    if saved is not None:
        return saved
    return 0 if world == 1 else 2


def choose_stage(cfg: TrainConfig, world: int, saved: int | None, tag: str | None) -> int:
    """:func:`zero_stage`, after checking that a resumed checkpoint ``tag`` saved at stage ``saved``
    matches an explicit ``--zero`` (the optimizer state is stage-specific)."""
    if saved is not None and cfg.zero != "auto" and not cfg.deepspeed and int(cfg.zero) != saved:
        raise CheckpointError(
            f"--resume: {tag} was saved with --zero {saved}, this run asks --zero {cfg.zero}; "
            f"resume with --zero {saved} (or auto)"
        )
    return zero_stage(cfg, world, saved)


def stage_note(cfg: TrainConfig, stage: int) -> str:
    """The stage for the run's first line: ``, ZeRO 0 (torch AdamW over fp32 weights)`` / ``, ZeRO-2``."""
    if cfg.deepspeed:
        return ""
    return ", ZeRO 0 (torch AdamW over fp32 weights)" if stage == 0 else f", ZeRO-{stage}"


def is_fast_path(cfg: TrainConfig, stage: int) -> bool:
    """Stage 0 without a --deepspeed file: fp32 master weights + autocast, our own clipping."""
    return stage == 0 and not cfg.deepspeed


def deepspeed_config(cfg: TrainConfig, device: torch.device, stage: int = 2) -> dict:
    ds = json.loads(Path(cfg.deepspeed).read_text()) if cfg.deepspeed else {"zero_optimization": {"stage": stage}}
    fast = is_fast_path(cfg, stage)
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_clipping=0.0 if fast else cfg.grad_clip,  # fast: Stepper clips, without a host read
        steps_per_print=ds.get("steps_per_print", 1 << 30),
    )
    ds.pop("train_batch_size", None)
    if device.type == "cuda" and fast:
        ds["bf16"] = {"enabled": False}
        # no lower-precision modules: several ranks all-reduce the fp32 gradients, as one rank keeps them
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif device.type == "cuda":
        ds.setdefault("bf16", {"enabled": True})
    else:
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
    return ds


def adamw(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW, one kernel for all parameters: ``fused`` on CUDA, ``foreach`` on CPU."""
    assert cfg.lr is not None  # TrainConfig.__post_init__ fills the stage default
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), **kw)


class Stepper:
    """One micro-batch of ``engine``: forward, backward (``no_sync`` when there is nothing to
    reduce), DeepSpeed's step, and at the accumulation boundary the fast path's clipping before
    it.  Nothing is read back from the device (the clip norm stays a device tensor)."""

    def __init__(self, engine, cfg: TrainConfig, stage: int, world: int):
        self.engine = engine
        self.fast = is_fast_path(cfg, stage)
        self.local = self.fast and world == 1
        self.clip = cfg.grad_clip
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def __call__(self, batch) -> dict:
        """Forward + backward + step of one micro-batch; -> the model's metrics (device tensors)."""
        loss, m = self.engine(batch)
        with self.engine.no_sync() if self.local else contextlib.nullcontext():
            self.engine.backward(loss)
        if self.fast and self.clip > 0 and self.engine.is_gradient_accumulation_boundary():
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.engine.step()
        return m


def compile_blocks(model: torch.nn.Module) -> int:
    """``--compile``: ``torch.compile`` (in place) each LLM decoder layer (the classes the Hugging
    Face model lists in ``_no_split_modules``, so any backbone) and each visual head depth layer;
    -> the number of modules compiled.  Whole-model compile is avoided: the LVLM's forward has
    data-dependent shapes (image placement, packing) that would recompile per batch."""
    names = set(getattr(getattr(model, "llm", None), "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names or isinstance(m, DepthLayer)]
    for m in blocks:
        m.compile()
    return len(blocks)


def build_engine(
    cfg: TrainConfig,
    device: torch.device,
    model,
    groups: list[dict],
    total: int,
    announce: bool,
    load_universal: bool = False,
    stage: int = 2,
):
    """``deepspeed.initialize`` over the trainable parameters of ``groups`` (``total`` steps) at ZeRO
    ``stage`` (:func:`zero_stage`); ``announce``: print the notice of a first DeepSpeed op build
    (rank 0); ``load_universal``: the engine will load a universal checkpoint (an elastic resume,
    see ``checkpoint.py``)."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, device, stage)
    if load_universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    params = [{"params": [p for p in g["params"] if p.requires_grad], "name": g["name"]} for g in groups]
    params = [g for g in params if g["params"]]
    optimizer = scheduler = None
    if "optimizer" not in ds_cfg:
        optimizer = adamw(params, cfg, device)
        if "scheduler" not in ds_cfg:
            warmup = max(1, math.ceil(cfg.warmup_ratio * total))
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, cosine_with_warmup(total, warmup, cfg.min_lr_ratio)
            )
    notice = libraries.build_notice()
    if notice and announce:
        print(notice, flush=True)  # --quiet or not: minutes of silence otherwise
    with libraries.quiet_stdout(cfg.verbose):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=params if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_cfg,
            dist_init_required=False,
        )
    return engine
