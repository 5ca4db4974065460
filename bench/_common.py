"""Set-up the bench scripts share: the SigLIP geometries they build random towers of, the
median wall time of a call with a device sync around it, and one ``asvr-pipeline tokenize``
run as a subprocess.

A script imports it as ``bench._common`` when a test imports the script as ``bench.x``, and
as ``_common`` when it runs as ``python bench/x.py`` (the script's folder is first on
``sys.path``): a ``try`` / ``except ModuleNotFoundError`` at the top of the script.
"""

from __future__ import annotations

import subprocess
import sys
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


def device_sync(cuda: bool) -> Callable[[], None]:
    """``torch.cuda.synchronize`` when ``cuda`` (kernels are asynchronous), else a no-op."""
    import torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    return sync


def median_time(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool = False) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after ``warmup`` (synchronising CUDA
    around each call when ``cuda``)."""
    sync = device_sync(cuda)
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


def tokenize_cmd(images_dir, tok_dir, out, batch: int, search_dtype: str, cuda: bool) -> list[str]:
    """``asvr-pipeline tokenize IMAGES --tokenizer TOK --out OUT`` as the benches run it: no
    progress bar, over an earlier OUT, bf16 encoder on CUDA."""
    return [
        sys.executable,
        "-m",
        "asvr.pipeline.cli",
        "tokenize",
        str(images_dir),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--batch-size",
        str(batch),
        "--no-progress",
        "--overwrite",
        "--encoder-dtype",
        "bfloat16" if cuda else "float32",
        "--search-dtype",
        search_dtype,
    ]


def run_cli(cmd: list[str], timeout: float) -> tuple[int, str]:
    """-> (exit code, stdout + the last 3000 characters of stderr); 124 and "timeout" past ``timeout``."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr[-3000:]
    except subprocess.TimeoutExpired:
        return 124, "timeout"
