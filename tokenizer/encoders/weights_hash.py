"""The encoder weights' sha256, remembered per file state, so a tokenizer's weights are
hashed once per artifact and machine, not at every load (every encode actor of every
``asvr-pipeline`` run hashed the 1.6 GB SigLIP-so400m tower again: seconds per actor
start; bench/results/gpu_issues_12_13_h200.md).

A record maps the state of every hashed file -- absolute path (as given and resolved), device, inode, size,
``mtime_ns`` and ``ctime_ns`` -- to the digest.  A file rewritten in place, replaced by
a rename, or touched back to its old mtime changes ``ctime_ns`` (which no user call can
set) or its inode, so its record no longer matches and it is hashed again.  A record is
written only when no file changed while it was hashed, through the atomic writer; a
missing, unreadable or unwritable cache only costs the hash.  File times are coarse
(a kernel tick; seconds on some network filesystems), so a file changed again within
the same tick as the recorded state would look unchanged: as git does with "racily
clean" entries, no record is written for a file whose mtime or ctime is less than
``settle_s`` (2 s) old -- a just-written tower is hashed at every load until it settles.

Where: ``$ASVR_HASH_CACHE`` (``off`` disables it), else ``$XDG_CACHE_HOME/asvr/weights-sha256``,
else ``~/.cache/asvr/weights-sha256``: one folder per user (records are trusted as much
as the user's own files), never inside an artifact that may be shared read-only.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from asvr.core.atomic import atomic_write


def cache_dir() -> Path | None:
    """The record folder (module docstring), None when disabled."""
    env = os.environ.get("ASVR_HASH_CACHE", "")
    if env.lower() == "off":
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asvr" / "weights-sha256"


def file_states(paths: list[Path]) -> list[list]:
    """What a record is keyed by: per file (sorted) the absolute path as given (the digest
    hashes its name), the path it resolves to and that file's stat fields."""
    out = []
    for given in sorted(os.path.abspath(q) for q in paths):
        st = os.stat(given)
        out.append([given, os.path.realpath(given), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _record_path(folder: Path, states: list[list]) -> Path:
    return folder / (hashlib.sha256(json.dumps([s[0] for s in states]).encode()).hexdigest()[:32] + ".json")


def cached_digest(
    paths: list[Path], compute: Callable[[list[Path]], str], folder: Path | None, settle_s: float = 2.0
) -> str:
    """``compute(paths)``, or the digest recorded for exactly these file states."""
    if folder is None:
        return compute(paths)
    try:
        before = file_states(paths)
    except OSError:
        return compute(paths)  # let compute report the missing file
    rec = _record_path(folder, before)
    try:
        saved = json.loads(rec.read_text())
        if saved.get("files") == before and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = compute(paths)
    try:
        settled = all(max(s[5], s[6]) < time.time_ns() - settle_s * 1e9 for s in before)
        if settled and file_states(paths) == before:  # nothing changed while it was read, nor just before
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(rec, json.dumps({"files": before, "sha256": digest}) + "\n")
    except OSError:
        pass
    return digest
