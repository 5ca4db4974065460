"""The run folder's guards: one ``asvr-train`` per ``--output-dir``, and a full disk as one line.

* :func:`lock_run_folder`: two runs into the same ``--output-dir`` both used
  to succeed, interleaving ``metrics.jsonl`` and overwriting each other's
  checkpoints.  Rank 0 now holds ``RUN/.lock`` (``asvr.core.locks``, the
  pipeline's lock) from before the folder is checked or cleared until the
  process ends; a second run is refused with one line.
* :func:`check_run_folder`: a folder that holds a run is refused unless ``--resume`` or
  ``--overwrite`` says what to do with it; :func:`clear_run_folder` removes what a run wrote.
* :func:`disk_errors`: a checkpoint save or an export that runs out of space
  (``ENOSPC``), quota (``EDQUOT``) or file-size limit (``EFBIG``), or meets a
  read-only filesystem, is one line naming the folder, the filesystem it is
  on and its free space, instead of a traceback from inside ``torch.save``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from asvr.core.locks import FolderLock
from asvr.core.errors import AsvrError

from asvr.train.loop import checkpoint

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class DiskFullError(AsvrError):
    """A write failed for lack of space (or quota, or a read-only filesystem); one line."""


class RunFolderError(AsvrError):
    """--output-dir already holds a run and neither --resume nor --overwrite says what to do with it."""


# What a run writes in its folder (RUN/cache, the reusable feature cache, is not among them).
RUN_OUTPUTS = (
    checkpoint.CHECKPOINTS,
    "final",
    "metrics.jsonl",
    "loss.png",
    "train_config.json",
    "bad_samples.jsonl",
    "tensorboard",
)


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` has checkpoints, metrics or an export of an earlier run."""
    return any((run_dir / name).exists() for name in (checkpoint.CHECKPOINTS, "final", "metrics.jsonl"))


def check_run_folder(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to silently restart (and so overwrite) a run: before this check, rerunning a
    finished command without --resume started again at step 1 over the finished run."""
    if resume is None and not overwrite and holds_run(run_dir):
        raise RunFolderError(f"{run_dir} already holds a run: --resume auto to continue, --overwrite to start again")


def clear_run_folder(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def lock_run_folder(run_dir: Path) -> FolderLock:
    """Create ``run_dir`` and hold its lock (``FolderLocked`` when another run holds it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return FolderLock(run_dir, "asvr-train run (one run per --output-dir)")


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (the nearest existing ancestor)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def describe_disk(path: Path) -> str:
    """``the filesystem at /mnt/x (12.0 KB free of 2.0 MB)``."""
    mount = mount_point(path)
    try:
        usage = shutil.disk_usage(mount)
    except OSError:
        return f"the filesystem at {mount}"
    return f"the filesystem at {mount} ({_size(usage.free)} free of {_size(usage.total)})"


@contextlib.contextmanager
def disk_errors(path: Path, what: str, then: str) -> Iterator[None]:
    """Turn a disk-space OSError inside the block into :class:`DiskFullError`:
    ``cannot write <what> to <path>: <reason> on <disk>; <then>``."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        reason = os.strerror(e.errno).lower() if e.errno is not None else str(e)
        raise DiskFullError(f"cannot write {what} to {path}: {reason} on {describe_disk(path)}; {then}") from None
    except RuntimeError:
        # torch.save (DeepSpeed's writer) reports a full disk from its C++ stream as a RuntimeError
        # without the errno ("basic_ios::clear: iostream error", "unexpected pos ..."): judged by
        # the free space left where it wrote
        if _free(path) >= LOW_SPACE:
            raise
        raise DiskFullError(f"cannot write {what} to {path}: no space left on {describe_disk(path)}; {then}") from None


LOW_SPACE = 16 << 20
"""Below this many free bytes a failed torch.save is taken for a full disk (a checkpoint is larger)."""


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(mount_point(path)).free
    except OSError:
        return LOW_SPACE
