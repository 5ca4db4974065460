"""The DeepSpeed engine of ``asvr-train``: its config from the command's options (a
``--deepspeed`` file, else ZeRO ``--zero``; bf16 on CUDA, fp32 on CPU) and torch's AdamW with a
cosine schedule after a linear warmup, unless the config brings its own optimizer / scheduler.
Split from ``trainer.py`` (issue 21): the trainer says *when* the engine is built, this module
*how*.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from asvr.train import libraries
from asvr.train.config import TrainConfig


def cosine_with_warmup(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(cfg: TrainConfig, device: torch.device) -> dict:
    ds = json.loads(Path(cfg.deepspeed).read_text()) if cfg.deepspeed else {"zero_optimization": {"stage": cfg.zero}}
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_clipping=cfg.grad_clip,
        steps_per_print=ds.get("steps_per_print", 1 << 30),
    )
    ds.pop("train_batch_size", None)
    if device.type == "cuda":
        ds.setdefault("bf16", {"enabled": True})
    else:
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
    return ds


def build_engine(
    cfg: TrainConfig,
    device: torch.device,
    model,
    groups: list[dict],
    total: int,
    announce: bool,
    load_universal: bool = False,
):
    """``deepspeed.initialize`` over the trainable parameters of ``groups`` (``total`` steps);
    ``announce``: print the notice of a first DeepSpeed op build (rank 0); ``load_universal``: the
    engine will load a universal checkpoint (an elastic resume, see ``checkpoint.py``)."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, device)
    if load_universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    params = [{"params": [p for p in g["params"] if p.requires_grad], "name": g["name"]} for g in groups]
    params = [g for g in params if g["params"]]
    optimizer = scheduler = None
    if "optimizer" not in ds_cfg:
        assert cfg.lr is not None  # TrainConfig.__post_init__ fills the stage default
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
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
