"""One writer per output folder: an advisory ``fcntl.flock`` on ``FOLDER/.lock``.

The kernel drops the lock when the holder exits, ``kill -9`` included, so a
crashed run never leaves a stale lock to clean up (a pid file would).  Used
by ``asvr-pipeline`` (its ``OUT``) and ``asvr-train`` (its ``--output-dir``).
``flock`` on NFS is emulated with POSIX locks by Linux (since 2.6.12), which
is enough for two jobs on different nodes.  Standard library only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from asvr.core.errors import AsvrError

LOCK = ".lock"


class FolderLocked(AsvrError):
    """Another process holds the folder's lock; one line."""


class FolderLock:
    """Hold ``folder/.lock`` until :meth:`close` (or the process ends).  ``what`` finishes the
    refusal: ``f"{folder} is being written by another {what}"``."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder)
        self._file = open(self.folder / LOCK, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise FolderLocked(f"{self.folder} is being written by another {what}") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
