"""What DeepSpeed and transformers print under ``asvr-train``, and the documented
knobs that keep it out of the way (no patches), so a run shows our progress bar
and our summary.  ``--verbose`` leaves the libraries as they are.

Measured on a tiny CPU run before this module (DeepSpeed 0.19, transformers 5):

* DeepSpeed auto-detection warns "Setting accelerator to CPU ..." on every
  start; ``DS_ACCELERATOR=cpu`` (its documented override) names the CPU
  accelerator instead, so nothing is detected and nothing is warned.
* DeepSpeed's CPU communication backend JIT-compiles a C++ op,
  ``deepspeed_shm_comm`` (shared-memory all-reduce), the first time a process
  group is set up on a machine: 2m17s on a busy 2-core machine, with no
  output; it is cached under ``TORCH_EXTENSIONS_DIR``.  ``deepspeed.initialize``
  builds it even for one process and there is no runtime switch to skip it
  (``DS_BUILD_SHM_COMM`` acts at install time), so ``build_notice`` says
  what is happening before it starts.  The optimizer is already torch's
  AdamW, which needs no compiled op.
* One cache per environment: torch's default cache is in the home folder
  (``~/.cache/torch_extensions/py311_cpu``), shared by every venv of that
  Python, so a venv with another torch or DeepSpeed rebuilt the op (2-5
  min) over the other's build each time it ran, silently.  Unless the user
  sets ``TORCH_EXTENSIONS_DIR``, ``configure`` points it at
  ``<sys.prefix>/.cache/torch_extensions`` (inside the venv: removed with
  it), or keeps torch's default when that folder cannot be written (a
  system Python).  ``build_notice`` is printed whenever the op is about to
  be built, ``--quiet`` or not.
* After that DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op
  built successfully" on every start (a ``print``, not a log record);
  ``quiet_stdout`` holds what ``deepspeed.initialize`` prints.
* With ZeRO-3, DeepSpeed calls ``torch.distributed.all_gather_into_tensor`` and
  ``reduce_scatter_tensor``, which torch 2.13 flags with a FutureWarning on every
  run; ``configure`` filters exactly those two messages.
* transformers draws a "Loading weights" bar for the LLM;
  ``transformers.utils.logging.disable_progress_bar`` turns it off, and
  ``set_verbosity_error`` keeps its advisory warnings out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

SHM_OP = "deepspeed_shm_comm"


def env_extensions_dir() -> Path | None:
    """``<sys.prefix>/.cache/torch_extensions`` when it can be created there, else None."""
    prefix = Path(sys.prefix)
    root = prefix / ".cache" / "torch_extensions"
    if root.is_dir() and os.access(root, os.W_OK):
        return root
    return root if os.access(prefix, os.W_OK) else None


def configure(verbose: bool = False) -> None:
    """Set the libraries' documented knobs; call before deepspeed is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = env_extensions_dir()
        if root is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = str(root)  # torch's documented knob: one cache per venv
    if verbose:
        return
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def extensions_dir() -> Path:
    """Where torch's JIT extensions land (torch.utils.cpp_extension's rule)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    accel = (
        f"rocm{torch.version.hip.replace('.', '')}"
        if torch.version.hip
        else f"cu{torch.version.cuda.replace('.', '')}"
        if torch.version.cuda
        else "cpu"
    )
    return (
        Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}"
        f"{getattr(sys, 'abiflags', '')}_{accel}"
    )


def build_notice() -> str | None:
    """A one-line notice when ``deepspeed.initialize`` is about to compile the CPU
    shared-memory op (first run on this machine), else None."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return None
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return None
    where = extensions_dir() / SHM_OP
    if (where / f"{SHM_OP}.so").exists():
        return None
    return (
        f"building DeepSpeed's CPU communication op ({SHM_OP}): ~2 min on 2 cores, once per environment; "
        f"cached in {where.parent}"
    )


@contextlib.contextmanager
def quiet_stdout(verbose: bool):
    """Hold what the block prints to stdout; pass it on with ``verbose``."""
    if verbose:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        sys.stdout.write(buf.getvalue())  # what led to the error is worth seeing
        raise
