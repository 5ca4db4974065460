"""Checkpoints: DeepSpeed engine state + loader position + RNG, and ``--init-from``.

Layout under ``RUN/checkpoints``: one DeepSpeed tag folder per save
(``step00000042``: module, ZeRO optimizer partitions, LR scheduler, and our
``client_state``), plus DeepSpeed's ``latest`` file naming the newest tag;
``save`` keeps the newest ``--keep-checkpoints`` tags.
``client_state`` = ``{step, loader: {epoch, position, ...}}``.  RNG states
are per rank: each rank saves its own ``rng-rank<r>.pt`` inside the tag
folder, so dropout and sampling continue exactly where they stopped.

``load_pretrained`` (``--init-from``) loads an exported model (``RUN/final``
or an export folder) before DeepSpeed wraps the model: strict keys, and the
tokenizer fingerprint must be this run's.

Our own files never unpickle: ``rng-rank<r>.pt`` holds only tensors, ints and
strings (Python's Mersenne state as an int64 tensor, numpy's as a tensor plus
numbers) and is read with ``torch.load(weights_only=True)``, so a planted
pickle there is refused instead of run.  DeepSpeed's own files (module,
optimizer, ``client_state``) are loaded by DeepSpeed, which unpickles them: a
run folder is trusted input (README), like any PyTorch checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from asvr.tokenizer.errors import check_fingerprint

CHECKPOINTS = "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    """Every RNG as tensors and plain numbers (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    np.random.set_state(
        (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(path: Path) -> dict:
    """``rng-rank<r>.pt`` -> state; never unpickles code (a planted pickle is a one-line error)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for anything but tensors/containers
        raise CheckpointError(
            f"{path}: not an RNG state file of this project, refused without running it "
            f"({type(e).__name__}); the run folder is trusted input, check who wrote it"
        ) from None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; one line."""


def save(engine, run_dir: Path, step: int, loader_state: dict, rank: int, keep: int) -> Path:
    """Collective: every rank calls it.  Keeps the newest ``keep`` tags (0: all)."""
    import torch.distributed as dist

    ckpt = run_dir / CHECKPOINTS
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"step": step, "loader": loader_state})
    torch.save(rng_state(), ckpt / tag / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0 and keep > 0:
        for old in checkpoint_dirs(ckpt)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt / tag


def checkpoint_dirs(ckpt: Path) -> list[Path]:
    """The checkpoint folders under ``RUN/checkpoints``, oldest first (``step`` tags sort by step)."""
    return sorted(p for p in ckpt.glob("step*") if p.is_dir())


def _has_model_states(folder: Path) -> bool:
    """DeepSpeed wrote the model states of this tag (``mp_rank_*`` / ``zero_pp_rank_*`` files)."""
    return any(folder.glob("*model_states.pt"))


def latest_tag(run_dir: Path) -> str | None:
    f = run_dir / CHECKPOINTS / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (run_dir / CHECKPOINTS / tag).is_dir() else None


def load(engine, run_dir: Path, rank: int, tag: str | None = None) -> dict | None:
    """Restore the newest (or ``tag``) checkpoint into ``engine``; returns its client state
    (``step``, ``loader``) or None when the run has none.  Collective."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    ckpt = run_dir / CHECKPOINTS
    if not (ckpt / tag).is_dir():  # DeepSpeed would fail an assert with no message
        there = ", ".join(p.name for p in checkpoint_dirs(ckpt)) or "none"
        raise CheckpointError(f"--resume {tag}: no such checkpoint in {ckpt} (there: {there})")
    if not _has_model_states(ckpt / tag):  # a save cut short: DeepSpeed asserts, no message
        whole = ", ".join(p.name for p in checkpoint_dirs(ckpt) if _has_model_states(p)) or "none"
        raise CheckpointError(
            f"--resume {tag}: {ckpt / tag} holds no DeepSpeed model states (a save cut short?); "
            f"complete checkpoints: {whole}"
        )
    _, client = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    rng = ckpt / tag / f"rng-rank{rank}.pt"
    if rng.exists():
        set_rng_state(load_rng_state(rng))
    return client


def load_pretrained(model, folder: str | Path, fingerprint: str) -> Path:
    """``--init-from``: load an exported model (``RUN/final`` of a pretrain run, or the
    export folder itself) into ``model`` before DeepSpeed wraps it; strict keys, and
    the tokenizer fingerprint must match this run's."""
    from .export import CONFIG_FILE, ExportError, load_exported_weights

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() and (folder / "final" / CONFIG_FILE).exists():
        folder = folder / "final"
    if not (folder / CONFIG_FILE).exists():
        raise ExportError(
            f"--init-from {folder}: no exported model there (no {CONFIG_FILE}; a finished pretrain run has RUN/final)"
        )
    meta = json.loads((folder / CONFIG_FILE).read_text())
    got = (meta.get("model", {}).get("vision") or {}).get("fingerprint", "")
    check_fingerprint(got, fingerprint, f"--init-from {folder}", "this run's tokenizer")
    load_exported_weights(model, folder)
    return folder
