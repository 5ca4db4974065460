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

Completeness: DeepSpeed writes a tag's files and ``latest`` without renames,
so a kill during a save leaves a partial folder or an empty ``latest``.  Once
every rank has saved, rank 0 writes ``complete.json`` into the tag
(atomically) and then ``latest`` (atomically): a tag is *complete* when it
has that marker (tags written before the marker existed: DeepSpeed's model
states plus ``rng-rank0.pt``, written after DeepSpeed's save returned).
``--resume auto`` takes ``latest`` when it names a complete tag, else the
newest complete one and says why (:func:`resume_choice`); pruning keeps the
newest ``--keep-checkpoints`` complete tags and removes partial folders, so
it can never delete the checkpoint just written.

Elastic resume (issue 25): a tag saved on ``W`` data-parallel ranks resumed on ``W' != W``.
DeepSpeed's ZeRO-1/2 refuses optimizer partitions of another world size, so the tag is first
converted once, by rank 0, with DeepSpeed's own ``ds_to_universal`` into
``RUN/checkpoints/universal/<tag>`` (per-parameter fp32 master weights, Adam moments and step:
world-size independent), and the engine is built with ``"checkpoint": {"load_universal": true}``
and loads from there.  Chosen over saving a consolidated copy of the master weights and moments
at every save: no cost at save time (the conversion runs only when the world size changes), and
it is DeepSpeed's supported path for its own partition layout (ZeRO 1/2/3), not a second copy
of it written by us.  The module, scheduler and ``client_state`` come from the copied
``mp_rank_*`` file, so the LR schedule and the loader state continue; each rank that has no
``rng-rank<r>.pt`` of its own (a grown world) seeds its RNGs from ``(seed, rank, step)``.
The conversion is written to ``<tag>.tmp`` and renamed, and pruning a tag removes its universal
copy.

Our own files never unpickle: ``rng-rank<r>.pt`` holds only tensors, ints and
strings (Python's Mersenne state as an int64 tensor, numpy's as a tensor plus
numbers) and is read with ``torch.load(weights_only=True)``, so a planted
pickle there is refused instead of run.  DeepSpeed's own files (module,
optimizer, ``client_state``) are loaded by DeepSpeed, which unpickles them: a
run folder is trusted input (README), like any PyTorch checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.errors import AsvrError, check_fingerprint

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


def seed_everything(seed: int, rank: int, step: int) -> None:
    """Python, numpy and torch RNGs from ``(seed, rank, step)`` (a rank new to an elastic resume)."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


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


class CheckpointError(AsvrError):
    """A checkpoint file that cannot be used; one line."""


COMPLETE = "complete.json"
UNIVERSAL = "universal"


def save(engine, run_dir: Path, step: int, loader_state: dict, rank: int, keep: int) -> Path:
    """Collective: every rank calls it.  Marks the tag complete, then keeps the newest ``keep``
    complete tags (0: all) and removes partial ones.  A full disk is one line (``DiskFullError``)."""
    import torch.distributed as dist

    from asvr.train.loop.run_folder import disk_errors

    ckpt = run_dir / CHECKPOINTS
    tag = tag_for(step)
    with disk_errors(ckpt, "a checkpoint", "free space, then rerun with --resume auto"):
        engine.save_checkpoint(str(ckpt), tag=tag, client_state={"step": step, "loader": loader_state})
        with atomic_path(ckpt / tag / f"rng-rank{rank}.pt") as tmp:
            torch.save(rng_state(), tmp)
        dist.barrier()
        if rank == 0:
            done = {"step": step, "world": dist.get_world_size(), "zero": engine.zero_optimization_stage()}
            atomic_write(ckpt / tag / COMPLETE, json.dumps(done) + "\n")
            atomic_write(ckpt / "latest", tag)
            prune(ckpt, keep)
    dist.barrier()
    return ckpt / tag


def is_complete(folder: Path) -> bool:
    """Every rank finished saving this tag (module docstring)."""
    if (folder / COMPLETE).is_file():
        return True
    # a tag from before the marker: only when no marked tag is older (a partial save is newer)
    legacy = _has_model_states(folder) and (folder / "rng-rank0.pt").is_file()
    return legacy and not any((p / COMPLETE).is_file() for p in checkpoint_dirs(folder.parent) if p.name < folder.name)


def complete_tags(ckpt: Path) -> list[str]:
    """The complete tags under ``RUN/checkpoints``, oldest first."""
    return [p.name for p in checkpoint_dirs(ckpt) if is_complete(p)]


def prune(ckpt: Path, keep: int) -> None:
    """Remove partial tag folders, and complete ones beyond the newest ``keep`` (0: keep all)."""
    done = complete_tags(ckpt)
    keep_tags = set(done if keep <= 0 else done[-keep:])
    for folder in checkpoint_dirs(ckpt) + checkpoint_dirs(ckpt / UNIVERSAL):
        if folder.name not in keep_tags:
            shutil.rmtree(folder, ignore_errors=True)


def checkpoint_dirs(ckpt: Path) -> list[Path]:
    """The checkpoint folders under ``RUN/checkpoints``, oldest first (``step`` tags sort by step)."""
    return sorted(p for p in ckpt.glob("step*") if p.is_dir())


def _has_model_states(folder: Path) -> bool:
    """DeepSpeed wrote the model states of this tag (``mp_rank_*`` / ``zero_pp_rank_*`` files)."""
    return any(folder.glob("*model_states.pt"))


def latest_tag(run_dir: Path) -> str | None:
    """The tag ``--resume auto`` continues from (see :func:`resume_choice`), None when there is none."""
    return resume_choice(run_dir)[0]


def resume_choice(run_dir: Path) -> tuple[str | None, str]:
    """-> (tag or None, why): ``latest`` when it names a complete tag, else the newest complete tag.
    ``why`` is "" in the ordinary case, else the sentence ``--resume auto`` prints."""
    ckpt = run_dir / CHECKPOINTS
    f = ckpt / "latest"
    named = f.read_text(errors="replace").strip() if f.is_file() else ""
    if named and "/" not in named and (ckpt / named).is_dir() and is_complete(ckpt / named):
        return named, ""
    done = complete_tags(ckpt) if ckpt.is_dir() else []
    if not done:
        return None, f"--resume auto: no complete checkpoint in {ckpt}, starting from step 0"
    if not f.exists():
        problem = f"{f} is missing"
    elif not named:
        problem = f"{f} is empty (a save cut short)"
    elif not (ckpt / named).is_dir():
        problem = f"{f} names {named}, which is not there"
    else:
        problem = f"{f} names {named}, which is incomplete (a save cut short)"
    return done[-1], f"--resume auto: {problem}; resuming from {done[-1]}, the newest complete checkpoint"


def _saved(run_dir: Path, tag: str | None, key: str) -> tuple[Path | None, int | None]:
    """``tag``'s folder (None: no such tag) and the integer ``key`` of its completion marker
    (None: no marker, or a marker without it)."""
    folder = run_dir / CHECKPOINTS / tag if tag else None
    if folder is None or not folder.is_dir():
        return None, None
    try:
        return folder, int(json.loads((folder / COMPLETE).read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return folder, None


def saved_world(run_dir: Path, tag: str | None) -> int | None:
    """The number of data-parallel ranks that saved ``tag`` (its completion marker, else the
    number of ZeRO optimizer partitions); None when unknown (no such tag)."""
    folder, world = _saved(run_dir, tag, "world")
    if folder is None or world is not None:
        return world
    return len(list(folder.glob("*optim_states.pt"))) or None


def saved_zero(run_dir: Path, tag: str | None) -> int | None:
    """The ZeRO stage ``tag`` was saved with (its completion marker; tags from before the marker
    recorded it: 2, the default then); None when there is no such tag."""
    folder, zero = _saved(run_dir, tag, "zero")
    if folder is None:
        return None
    return 2 if zero is None else zero


def to_universal(run_dir: Path, tag: str, verbose: bool = False) -> Path:
    """Rank 0: ``RUN/checkpoints/universal/<tag>``, DeepSpeed's world-size independent form of
    ``tag`` (``ds_to_universal``), made once (module docstring)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from asvr.train import libraries

    out = run_dir / CHECKPOINTS / UNIVERSAL / tag
    if out.is_dir():
        return out
    tmp = out.with_name(tag + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(run_dir / CHECKPOINTS / tag),
        output_folder=str(tmp),
        num_extract_workers=1,  # >1 forks a process pool: not worth it for one conversion
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engines set no UNIVERSAL_CHECKPOINT_INFO (no tensor parallelism)
    )
    quiet_err = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())  # its tqdm bars
    with libraries.quiet_stdout(verbose), quiet_err:
        ds_to_universal(args)
    os.replace(tmp, out)
    return out


def load(
    engine, run_dir: Path, rank: int, tag: str | None = None, universal: bool = False, seed: int = 0
) -> dict | None:
    """Restore the newest (or ``tag``) checkpoint into ``engine``; returns its client state
    (``step``, ``loader``) or None when the run has none.  Collective.  ``universal``: from the
    tag's universal copy (:func:`to_universal`; the engine built with ``load_universal``)."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    ckpt = run_dir / CHECKPOINTS
    if not (ckpt / tag).is_dir():  # DeepSpeed would fail an assert with no message
        there = ", ".join(p.name for p in checkpoint_dirs(ckpt)) or "none"
        raise CheckpointError(f"--resume {tag}: no such checkpoint in {ckpt} (there: {there})")
    if not is_complete(ckpt / tag):  # a save cut short: DeepSpeed asserts or loads half a state
        whole = ", ".join(complete_tags(ckpt)) or "none"
        what = "no DeepSpeed model states" if not _has_model_states(ckpt / tag) else "no completion marker"
        raise CheckpointError(
            f"--resume {tag}: {ckpt / tag} is incomplete ({what}: a save cut short); complete checkpoints: {whole}"
        )
    src = ckpt / UNIVERSAL if universal else ckpt
    _, client = engine.load_checkpoint(str(src), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    rng = ckpt / tag / f"rng-rank{rank}.pt"
    if rng.exists():
        set_rng_state(load_rng_state(rng))
    elif universal:  # a rank the saved world did not have: its own seed, from where the run is
        seed_everything(seed, rank, int(client["step"]))
    else:
        print(
            f"warning: {rng} is missing: the random number generators of rank {rank} start from the seed, "
            "so dropout and sampling differ from an uninterrupted run",
            file=sys.stderr,
        )
    return client


def load_pretrained(model, folder: str | Path, fingerprint: str) -> Path:
    """``--init-from``: load an exported model (``RUN/final`` of a pretrain run, or the
    export folder itself) into ``model`` before DeepSpeed wraps it; strict keys, and
    the tokenizer fingerprint must match this run's."""
    from asvr.train.export.native import CONFIG_FILE, ExportError, load_exported_weights

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
    differ = head_differences(meta.get("model", {}).get("head") or {}, model.cfg.head)
    if differ:
        raise ExportError(
            f"--init-from {folder} has another visual head: {', '.join(differ)}; "
            "give the same --head-* options as the run that made it"
        )
    load_exported_weights(model, folder)
    return folder


def head_differences(stored: dict, head) -> list[str]:
    """``--head-width 64 there, 128 here`` for each visual-head option an export differs in."""
    from dataclasses import asdict

    from asvr.core.config_cli import _flag

    here = asdict(head)
    return [
        f"{_flag('head', k)} {stored[k]} there, {v} here" for k, v in here.items() if k in stored and stored[k] != v
    ]
