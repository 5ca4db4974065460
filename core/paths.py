"""Opening files named by data: root confinement and regular-file reads.

Keys and LLaVA ``image`` fields are data, written by whoever made the corpus.
Every package that turns one into a path goes through :func:`confine` (the
pipeline's LLaVA input, the trainer's ``--images`` for ``online``/``features``
input), so ``../x``, an absolute path, a NUL byte, a symlink loop or a symlink
pointing out of the root is refused the same way everywhere.

:func:`read_regular` never blocks on a FIFO and never reads a device: it opens
with ``O_NONBLOCK`` (opening a FIFO for reading then returns at once instead of
waiting for a writer) and checks ``fstat`` of the opened descriptor, so a file
swapped for a FIFO after a check is still refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from asvr.core.errors import AsvrError


class UnsafePathError(AsvrError):
    """A data-supplied path that must not be opened; the message says why."""


def confine(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` with symlinks resolved; refuses anything that is not inside ``root``.

    ``rel`` must be relative; ``..`` components are allowed only while the
    resolved path stays under the resolved root (LLaVA's own paths never use
    them).  Does not check that the file exists."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError("empty image path")
    if "\0" in rel:
        raise UnsafePathError("image path contains a NUL byte")
    if os.path.isabs(rel):
        raise UnsafePathError("image path is absolute: it escapes the image root")
    try:
        real_root = Path(root).resolve()
        target = (Path(root) / rel).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UnsafePathError(f"image path cannot be resolved ({e})") from None
    if not target.is_relative_to(real_root):
        raise UnsafePathError("image path escapes the image root")
    return target


def regular_file_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` (symlinks followed) cannot be read as an image file, or None."""
    try:
        st = os.stat(path)
    except RuntimeError as e:
        return f"cannot resolve: {e}"
    except OSError as e:
        return "symlink loop" if e.errno == 40 else f"cannot stat: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_kind(st.st_mode)})"
    return None


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file; ``OSError``-free: raises :class:`UnsafePathError` with the reason."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnsafePathError(f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"not a regular file ({_kind(st.st_mode)})")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise UnsafePathError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"
