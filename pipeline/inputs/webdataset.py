"""Input format ``webdataset``: uncompressed ``.tar`` shards, brace patterns allowed.

Key = ``__key__`` as webdataset computes it, the member name up to the first dot
of its basename; every member whose last suffix is an image suffix is an image
of that key, so ``x.v2.jpg`` is an image of ``x`` (a repeated key is a
duplicate); caption from ``txt`` or a ``json`` ``caption`` field.  Bytes are
read by offset from the tar itself (member names are only keys; link members
are refused), so a compressed tar is refused.  A tar whose member list ends
without the end-of-archive marker is an ``input`` failure row, since
:mod:`tarfile` silently stops listing at a cut or corrupt header.

Registered like a plug-in; detected (after the plug-ins) by the ``.tar`` suffix.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from asvr.pipeline.inputs.sources import (
    IMAGE_SUFFIXES,
    InputFormat,
    SourceError,
    SourceOptions,
    _Rows,
    register_input_format,
    too_big,
)

_IMAGE_EXTS = tuple(x[1:] for x in IMAGE_SUFFIXES)
# webdataset's own key split: everything before the first dot of the basename.
_WDS_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _detect(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar.zst")):
        raise SourceError(f"{path}: compressed tars are not supported (images are read by offset); use plain .tar")
    return name.endswith(".tar")


def _tar_end_problem(path: Path, end: int) -> str | None:
    """Why the tar does not end cleanly at ``end`` (where :mod:`tarfile` stopped listing), or None."""
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    if not block:
        return f"tar ends at byte {end} without the end-of-archive marker: it is truncated"
    if len(block) < tarfile.BLOCKSIZE:
        return f"tar is cut inside a member header at byte {end}: it is truncated, later members are lost"
    return f"unreadable member header at byte {end}: the tar is corrupt, later members are lost"


def _tar_span(m: tarfile.TarInfo) -> tuple[str, int, int]:
    """-> (kind, offset, size) of a member's bytes: ``tar``, ``size`` bytes at ``offset_data``; or
    ``tar-sparse``, a GNU or PAX sparse member, whose archive data holds only the parts that are
    not holes, so the reader re-reads its header at ``offset`` and lets :mod:`tarfile` expand it
    (read as one span, such a member took its bytes from the members after it)."""
    return ("tar-sparse", m.offset, m.size) if m.issparse() else ("tar", m.offset_data, m.size)


_Group = list[tuple[tarfile.TarInfo, str]]  # a sample's members with their lower-cased extension


def _scan_tar(path: Path, rows: _Rows, opts: SourceOptions) -> None:
    members, problem = _list_members(path)
    abspath = str(path.absolute())
    for key, group in _samples(path, members, rows).items():
        images = [(m, ext) for m, ext in group if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS]
        caps = [(m, ext) for m, ext in group if ext in ("txt", "json") and m.isfile()]
        cap = next((c for c in caps if c[1] == "txt"), None) or (caps[0] if caps else None)
        _add_ignored(path, group, images, cap, rows)
        for m, _ in images:
            _add_image(key, m, cap, path, abspath, rows, opts)
    if problem:
        rows.add(f"{path.name}#truncated", f"{path}", "input", error=f"{path}: {problem}")


def _list_members(path: Path) -> tuple[list[tarfile.TarInfo], str | None]:
    """The tar's members, and why its listing ended early or uncleanly (None: it ends at the marker)."""
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: not a readable uncompressed tar ({e})") from None
    members: list[tarfile.TarInfo] = []
    problem = None
    with tar:
        try:
            for m in tar:
                members.append(m)
        except tarfile.TarError as e:
            problem = f"tar is truncated or corrupt after {len(members)} members ({e})"
        end = tar.offset
    return members, problem or _tar_end_problem(path, end)


def _samples(path: Path, members: list[tarfile.TarInfo], rows: _Rows) -> dict[str, _Group]:
    """Members grouped by webdataset key, in tar order; a name without ``KEY.EXT`` is an ``ignored`` row."""
    groups: dict[str, _Group] = {}
    for m in members:
        match = _WDS_SPLIT.match(m.name)
        if not match:
            rows.add(m.name, f"{path}:{m.name}", "ignored", error="member name has no KEY.EXT form")
            continue
        groups.setdefault(match.group(1), []).append((m, match.group(2).lower()))
    return groups


def _add_ignored(path: Path, group: _Group, images: _Group, cap: tuple[tarfile.TarInfo, str] | None, rows: _Rows):
    """An ``ignored`` row for each member of a sample that is neither one of its images nor its caption."""
    for m, ext in group:
        if images and (m, ext) in images:
            continue
        if images and cap is not None and m is cap[0]:
            continue
        why = (
            ("not image data" if images else "its sample has no image member")
            if m.isfile()
            else "a folder, link or special member"
        )
        rows.add(m.name, f"{path}:{m.name}", "ignored", error=why)


def _add_image(
    key: str,
    m: tarfile.TarInfo,
    cap: tuple[tarfile.TarInfo, str] | None,
    path: Path,
    abspath: str,
    rows: _Rows,
    opts: SourceOptions,
) -> None:
    """The row of one image member: its span (and its caption's), or a failure row."""
    if not m.isfile():
        rows.add(
            key, f"{path}:{m.name}", "error", error=f"tar member {m.name!r} is a link or special file, not image data"
        )
        return
    big = too_big(m.size, opts, f"tar member {m.name!r}")
    if big:
        rows.add(key, f"{path}:{m.name}", "error", error=big)
        return
    kind, offset, size = _tar_span(m)
    cm = cap[0] if cap and cap[0].size <= opts.max_read_bytes else None  # a bad caption never fails an image
    cap_kind, cap_offset, cap_size = _tar_span(cm) if cm else ("", -1, -1)
    if cm is not None and cap:
        cap_kind = ("sparse:" if cap_kind == "tar-sparse" else "") + cap[1]
    rows.add(key, f"{path}:{m.name}", kind, abspath, offset, size, cap_offset, cap_size, cap_kind)


register_input_format(
    InputFormat(
        "webdataset",
        "*.tar webdataset shards, brace patterns allowed: 'data/shard-{000000..000099}.tar'; "
        "key = __key__ (name up to the first dot), every member ending in an image suffix is an image "
        "(a repeated key is a duplicate), caption from txt or json 'caption'",
        _scan_tar,
        detect=_detect,
        detect_last=True,
    )
)
