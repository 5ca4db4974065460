"""The process group of ``asvr-train``: torchrun's / deepspeed's when launched so, else one
process made here (127.0.0.1, a free port).  Split from ``trainer.py`` (issue 21)."""

from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, bool]:
    """-> (rank, world, created_here).  Uses torchrun/deepspeed env vars when launched so."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    else:
        # deepspeed.initialize reads these; a lone process is rank 0 of 1.
        for k, v in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(free_port())),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
        ):
            os.environ.setdefault(k, v)
        dist.init_process_group(backend, rank=0, world_size=1)
        # Kept for the life of the process: DeepSpeed caches its groups, so a
        # second in-process run (tests, notebooks) must find the same one.
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size(), True
