"""Set-up the bench scripts share: the SigLIP geometries they build random towers of, and the
median wall time of a call with a device sync around it.

A script imports it as ``bench._common`` when a test imports the script as ``bench.x``, and
as ``_common`` when it runs as ``python bench/x.py`` (the script's folder is first on
``sys.path``): a ``try`` / ``except ModuleNotFoundError`` at the top of the script.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    image_size=384,
)
"""SigLIP-so400m-patch14-384's geometry (random weights: the benches time, they do not score)."""
SIGLIP_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)
"""A 4 x 4-patch SigLIP for the ``--tiny`` / CPU runs."""


def siglip_config(tiny: bool = False, **overrides):
    """A ``SiglipVisionConfig`` of :data:`SIGLIP_SO400M` (``tiny``: :data:`SIGLIP_TINY`)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**{**(SIGLIP_TINY if tiny else SIGLIP_SO400M), **overrides})


def median_time(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool = False) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after ``warmup`` (synchronising CUDA
    around each call when ``cuda``: kernels are asynchronous)."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))
