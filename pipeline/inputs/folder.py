"""Input format ``folder``: images found recursively; key = the path relative to the folder (posix).

Dotfiles and dotfolders are skipped; ``<stem>.txt`` beside an image is its
caption; every other file is an ``ignored`` row.  A symlinked file must stay
under the folder (:func:`asvr.core.paths.confine`); a symlinked sub-folder is
never walked: one ``ignored`` row names it (one leaving the folder is refused;
one inside it is planned once, under its own path).  :func:`folder_parts` cuts a
folder into listing jobs (its own files, then each subfolder) so the plan of a
large tree is listed in parallel (:mod:`asvr.pipeline.job.plan`).

Registered like a plug-in; detected (after the plug-ins) by being a folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from asvr.core.paths import UnsafePathError, confine, regular_file_error

from asvr.pipeline.inputs.sources import (
    IMAGE_SUFFIXES,
    InputFormat,
    SourceError,
    SourceOptions,
    _file_size_error,
    _Rows,
    register_input_format,
)


def folder_parts(root: Path) -> list[str]:
    """A folder INPUT as listing jobs, in plan order: ``""`` (the folder's own files), then each
    subfolder (sorted, no dotfolders, no folder links: the order and the folders ``os.walk`` visits)."""
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder")
    with os.scandir(root) as it:
        subs = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    return ["", *subs]


def _scan_folder(root: Path, rows: _Rows, opts: SourceOptions, part: str | None = None) -> None:
    """``part``: None for the whole folder, else one of :func:`folder_parts` (keys stay relative to ``root``);
    ``opts.max_read_mb`` turns an oversized file into a failure row before it is read."""
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder")
    start = root / part if part else root
    for dirpath, dirnames, filenames in os.walk(start):  # followlinks=False: no loops, no escape by dir links
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # the root part lists the folder's own files (and its linked folders' rows); subfolders are their own parts
        walk_into = [] if part == "" and Path(dirpath) == start else dirnames
        _add_files(root, Path(dirpath), filenames, rows, opts)
        for name in dirnames:  # os.walk lists a linked folder here but never enters it: one row says why
            p = Path(dirpath) / name
            if p.is_symlink():
                rows.add(p.relative_to(root).as_posix(), str(p), "ignored", error=_linked_folder(root, p))
        dirnames[:] = walk_into


def _add_files(root: Path, folder: Path, filenames: list[str], rows: _Rows, opts: SourceOptions) -> None:
    """The rows of one folder's files: each image (with its sidecar caption), each other file ``ignored``."""
    names = set(filenames)
    images = {Path(n).stem for n in filenames if n.lower().endswith(IMAGE_SUFFIXES)}
    for name in sorted(filenames):
        if name.startswith("."):
            continue
        p = folder / name
        key = p.relative_to(root).as_posix()
        if not name.lower().endswith(IMAGE_SUFFIXES):
            if not (name.endswith(".txt") and name[:-4] in images):  # a sidecar caption belongs to its image
                rows.add(key, str(p), "ignored", error="not an image file (suffix)")
            continue
        error = _image_file_error(root, p, key, opts)
        txt = Path(name).stem + ".txt"
        caption = _sidecar_caption(folder / txt) if error is None and txt in names else None
        rows.add(key, str(p), "error" if error else "file", str(p.absolute()), caption=caption, error=error)


def _image_file_error(root: Path, p: Path, key: str, opts: SourceOptions) -> str | None:
    """Why the image file ``p`` (``key`` under ``root``) is a failure row before it is read, or None."""
    error = None
    if p.is_symlink():
        try:
            confine(root, key)
        except UnsafePathError as e:
            error = f"symlink: {e}".replace("image path escapes the image root", "points outside the input folder")
    return error or regular_file_error(p) or _file_size_error(p, opts)


def _sidecar_caption(txt: Path) -> str | None:
    try:
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _linked_folder(root: Path, link: Path) -> str:
    """Why a symlinked sub-folder is not walked (the ``ignored`` row's error)."""
    try:
        target = confine(root, link.relative_to(root).as_posix())
    except UnsafePathError:
        return "symlink to a folder outside the input folder: not followed (pass that folder as an INPUT of its own)"
    inside = target.relative_to(root.resolve())
    if any(part.startswith(".") for part in inside.parts):
        return f"symlink to the hidden folder {inside.as_posix()!r} of this input: not followed (dotfiles are skipped)"
    where = inside.as_posix() if inside.parts else "."
    return f"symlink to the folder {where!r} of this input: not followed (its files are planned under their own path)"


register_input_format(
    InputFormat(
        "folder",
        "images found recursively; key = path relative to the folder (posix)",
        _scan_folder,
        detect=lambda path: path.is_dir(),
        detect_last=True,
    )
)
