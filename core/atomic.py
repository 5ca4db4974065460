"""The one way ASVR writes a file or a folder: nothing half-written is ever visible.

Every output (tokenizer artifacts, code shards, manifests, indexes, reports,
PNGs, caches, exports) goes through :func:`atomic_path` / :func:`atomic_write`
(files) or :func:`atomic_dir` (folders):

1. write under a temporary name in the same folder (``.NAME.tmp-XXXXXXXX``,
   so a same-filesystem rename is possible and ``asvr-pipeline`` can sweep a
   killed run's leftovers with one glob),
2. fsync the data,
3. rename over the final name (atomic on POSIX), fsync the folder,
4. on any error, Ctrl-C included, remove the temporary.

The result gets the permissions a plain ``open()`` would give (0666/0777
minus the user's umask), not ``mkstemp``'s 0600; inside an :func:`atomic_dir`
folder too, whatever the library that wrote a file chose (safetensors writes
0600), executable bits kept.  :func:`atomic_dir` replaces an existing
``path`` only when asked (``replace=True``, the default for folders this
project owns, like ``RUN/final``); callers writing to a user-named folder pass
``replace=False`` unless the user said ``--overwrite`` and the folder is an
earlier output (a non-empty folder or a file is then refused with
``FileExistsError``, never removed).  Standard library only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; whatever the block writes there replaces ``path``
    when the block ends without an error.  ``suffix`` keeps an extension for writers that look at it."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _refuse_existing(path: Path) -> None:
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty folder: nothing of anyone's is replaced
    if path.exists() or path.is_symlink():
        what = "a folder with files in it" if path.is_dir() else "a file"
        raise FileExistsError(f"{path} is {what}; choose a new or empty folder")


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; when the block ends without an error its files are
    fsynced and it replaces ``path`` (an existing ``path`` is moved aside first, then removed).
    ``replace=False``: an existing ``path`` that is a file or a non-empty folder raises
    ``FileExistsError`` before anything is written (and again, checked, before the swap)."""
    path = Path(path)
    if not replace:
        _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                executable = f.stat().st_mode & 0o111
                os.chmod(f, (0o777 if executable else 0o666) & ~umask)
            elif f.is_dir() and not f.is_symlink():
                os.chmod(f, 0o777 & ~umask)
        if not replace:
            _refuse_existing(path)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
