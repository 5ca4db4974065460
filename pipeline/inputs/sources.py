"""Input discovery: turn INPUT arguments into one ordered plan of images.

The plan is a pyarrow table, one row per input image, in a deterministic
order: inputs in the order given (brace patterns expanded in order), and
within each input its natural order (folder: sorted relative paths; tar: member
order; Parquet: row order; LLaVA JSON: first reference order).  Input order
rather than a global sort by key keeps reads sequential within a tar or a
Parquet file (a key sort would seek across every tar for every batch), and is
just as reproducible, which is all that resuming needs.

Columns: ``key``, ``source`` (human readable location for failures), ``kind``
(``file`` | ``tar`` | ``tar-sparse`` | ``parquet`` | ``error`` | ``input`` | ``ignored``), ``path`` (the file to open),
``offset``/``size`` (tar data span, a sparse member's header offset and real size, or Parquet row
group / row in group),
``cap_offset``/``cap_size``/``cap_kind`` (tar caption member), ``caption``
(known at discovery: sidecar .txt, Parquet column), ``image_column`` (Parquet), ``error`` (why a row
cannot be read: it becomes a failure row at stage ``read``; for ``input``, a
whole input that is cut short, at stage ``input``; for ``ignored``, why a file or
tar member is not an input image).

Every file of a folder and every member of a tar is accounted for: an image is
a plan row (a later image with the same key is a duplicate), a caption beside
an image belongs to that image, anything else is an ``ignored`` row (counted as
``ignored`` in the manifest, listed in ``failures.parquet``).  Nothing is opened
that is not a regular file (a FIFO named ``x.jpg`` would block a reader
forever), a name that is not valid UTF-8 is a failure row (keys are UTF-8), and
a tar whose member list ends without the end-of-archive marker is an ``input``
failure row, since :mod:`tarfile` silently stops listing at a cut or corrupt
header.

Keys are data, never paths.  Nothing here opens a file named by a key except
LLaVA JSON images, which go through :func:`asvr.core.paths.confine` and
must stay under ``--image-root`` (symlinks followed, then checked); folder
inputs check that a symlinked file stays under the folder and never walk a symlinked
sub-folder: one ``ignored`` row names it (one leaving the folder is refused; one inside
it is planned once, under its own path).  Tar member names are only used as keys: bytes
are read by offset from the tar itself, and link members are refused.

Formats: ``folder`` (recursive, dotfiles skipped, ``<stem>.txt`` beside an
image is its caption), ``webdataset`` (uncompressed ``.tar``; key =
``__key__`` as webdataset computes it, the member name up to the first dot of
its basename; every member whose last suffix is an image suffix is an image of
that key, so ``x.v2.jpg`` is an image of ``x``; caption from ``txt`` or a
``json`` ``caption`` field), ``parquet`` (image bytes column,
raw binary or a Hugging Face ``{bytes, path}`` struct), ``llava`` (``.json`` or
``.jsonl`` records with an ``image`` string or list), plus every registered
plug-in format.

Adding a format is one module ``asvr/pipeline/input_<name>.py`` (and its test)
that calls :func:`register_input_format` with an :class:`InputFormat`: how to
recognise an INPUT, how to add its images to the plan, and, when its rows need
a reader of their own, a ``kind`` -> reader function.  ``input_*`` modules are
imported by :func:`input_formats`, so the CLI's ``--input-format`` choices,
auto-detection and the Ray read stage all see it (``input_hf_datasets.py`` is
the example).
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.llava_json import LlavaJSONError, read_llava_records
from asvr.core.paths import UnsafePathError, confine, regular_file_error
from asvr.core.registry import Registry
from asvr.core.errors import AsvrError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_EXTS = tuple(x[1:] for x in IMAGE_SUFFIXES)
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "image_bytes", "bytes", "img")
PARQUET_KEY_COLUMNS = ("key", "__key__", "id", "path", "file_name", "filename")
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt")
DEFAULT_MAX_READ_BYTES = 256 * 2**20
"""Half of a decode task's memory reservation (``runner.DECODE_TASK_MEMORY``, 512 MiB): the bytes
read, and their one copy as a Python ``bytes``, fit beside the decoded image."""
# webdataset's own key split: everything before the first dot of the basename.
_WDS_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("cap_offset", pa.int64()),
        ("cap_size", pa.int64()),
        ("cap_kind", pa.string()),
        ("caption", pa.string()),
        ("image_column", pa.string()),
        ("error", pa.string()),
    ]
)


class SourceError(AsvrError):
    """Bad INPUT arguments (missing file, unknown format): a one-line CLI error."""


def _megabytes(text: str) -> int:
    """``--max-read-mb 8`` -> 8 MiB in bytes (the field's unit)."""
    return int(float(text) * 2**20)


def _format_names() -> list[str]:
    return ["auto", *input_formats()]


@dataclass(frozen=True)
class SourceOptions:
    """How every INPUT is read: the ``inputs`` options of ``asvr-pipeline tokenize``."""

    input_format: str = field(default="auto", metadata={"choices": _format_names})
    """Format of every INPUT (default: detect each)."""
    image_root: str | None = None
    """Folder that LLaVA JSON image paths are relative to."""
    image_column: str | None = None
    """Parquet column holding image bytes (default: first of image, jpg, png, image_bytes, bytes, img)."""
    key_column: str | None = None
    """Parquet column holding the key (default: first of key, __key__, id, path, file_name; else <file>/<row>)."""
    caption_column: str | None = None
    """Parquet column holding a caption (default: first of caption, text, txt; else none)."""
    max_read_bytes: int = field(
        default=DEFAULT_MAX_READ_BYTES,
        metadata={"flag": "--max-read-mb", "type": _megabytes, "metavar": "MAX_READ_MB", "show_default": False},
    )
    """An image file, tar member or Parquet row group (image column, uncompressed) of more MiB than this fails
    before it is read, from sizes known before reading: a 39 KB Parquet file can hold a 1 GB cell (default 256:
    half a decode task's memory; a config file gives max_read_bytes, in bytes)."""

    def __post_init__(self):
        if self.max_read_bytes < 1:
            raise SourceError("--max-read-mb must be > 0")
        names = ("auto", *input_formats())
        if self.input_format not in names:
            raise SourceError(f"--input-format must be one of {', '.join(names)}, got {self.input_format!r}")


@dataclass
class _Rows:
    cols: dict[str, list] = field(default_factory=lambda: {n: [] for n in PLAN_SCHEMA.names})

    def add(
        self,
        key,
        source,
        kind,
        path="",
        offset=-1,
        size=-1,
        cap_offset=-1,
        cap_size=-1,
        cap_kind="",
        caption=None,
        image_column=None,
        error=None,
    ):
        if not all(_utf8(v) for v in (key, source, path)):  # a file name that is not UTF-8 (surrogate-escaped)
            key, source = _escaped(key), _escaped(source)
            path, offset, size, cap_offset, cap_size, cap_kind, caption = "", -1, -1, -1, -1, "", None
            if kind != "ignored":
                kind, error = "error", "file name is not valid UTF-8 (keys are UTF-8 strings); rename the file"
        for name, v in zip(
            PLAN_SCHEMA.names,
            (key, source, kind, path, offset, size, cap_offset, cap_size, cap_kind, caption, image_column, error),
        ):
            self.cols[name].append(v)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=PLAN_SCHEMA)


# --------------------------------------------------------------------------- the format registry
@dataclass(frozen=True)
class InputFormat:
    """One kind of INPUT.  ``scan(path, rows, opts)`` adds one plan row per image (``rows.add``);
    ``detect(path)`` says whether an INPUT is of this format (plug-ins are asked before the
    built-in suffix rules, so a folder with a special layout can claim it); ``readers`` maps a
    plan-row ``kind`` this format emits to ``read(row, handles) -> image bytes``, where
    ``handles`` is a per-block dict for open files (raise :class:`ImageError` for one bad image)."""

    name: str
    help: str
    scan: Callable[[Path, "_Rows", "SourceOptions"], None]
    detect: Callable[[Path], bool] | None = None
    readers: dict[str, Callable[[dict, dict], bytes]] = field(default_factory=dict)


FORMATS: Registry[InputFormat] = Registry("input format", "asvr.pipeline.inputs", "", reserved=("auto",))
_BUILTIN = ("folder", "webdataset", "parquet", "llava")


def register_input_format(fmt: InputFormat) -> InputFormat:
    clash = [k for k in fmt.readers for f in FORMATS.registered() if k in f.readers] + [
        k for k in fmt.readers if k in ("file", "tar", "tar-sparse", "parquet", "error", "input", "ignored")
    ]
    if clash:
        raise ValueError(f"input format {fmt.name!r}: row kind {clash[0]!r} already has a reader")
    return FORMATS.register(fmt.name, fmt)


def input_formats() -> dict[str, InputFormat]:
    """name -> format: the built-ins, then every ``asvr.pipeline.input_*`` module (imported once)."""
    return FORMATS.all()


def row_reader(kind: str) -> Callable[[dict, dict], bytes] | None:
    """The reader a plug-in format registered for plan rows of ``kind`` (None: a built-in kind)."""
    return next((f.readers[kind] for f in input_formats().values() if kind in f.readers), None)


def _utf8(s: str | None) -> bool:
    try:
        s is None or s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def too_big(nbytes: int, opts: SourceOptions, what: str) -> str | None:
    """The failure reason of a read of ``nbytes`` over ``opts.max_read_bytes``, or None."""
    if nbytes <= opts.max_read_bytes:
        return None
    return f"{what} is {nbytes / 2**20:.1f} MiB, more than the {opts.max_read_bytes / 2**20:.0f} MiB one decode task reads (--max-read-mb)"


def _file_size_error(path: str | os.PathLike, opts: SourceOptions) -> str | None:
    try:
        return too_big(os.stat(path).st_size, opts, "the image file")
    except OSError:
        return None  # the reader reports why it cannot be read


def _escaped(s: str) -> str:
    """A surrogate-escaped file name as valid UTF-8 text (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(s).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- expansion + detection
def expand_inputs(inputs: list[str]) -> list[Path]:
    """Brace patterns (``shard-{000..009}.tar``) and globs, in order; each must exist."""
    import braceexpand

    out: list[Path] = []
    for pattern in inputs:
        for p in braceexpand.braceexpand(pattern):
            if any(c in p for c in "*?["):
                hits = sorted(glob.glob(p))
                if not hits:
                    raise SourceError(f"input {p!r} matches no file")
                out.extend(Path(h) for h in hits)
            elif not os.path.exists(p):
                raise SourceError(f"input {p} does not exist")
            else:
                out.append(Path(p))
    if not out:
        raise SourceError("no INPUT given")
    return out


def detect_format(path: Path) -> str:
    for fmt in input_formats().values():
        if fmt.name not in _BUILTIN and fmt.detect is not None and fmt.detect(path):
            return fmt.name
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".json", ".jsonl")):
        return "llava"
    if name.endswith((".tar.gz", ".tgz", ".tar.zst")):
        raise SourceError(f"{path}: compressed tars are not supported (images are read by offset); use plain .tar")
    raise SourceError(f"{path}: cannot tell its format (folder, .tar, .parquet, .json); pass --input-format")


# --------------------------------------------------------------------------- formats
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
        names = set(filenames)
        images = {Path(n).stem for n in filenames if n.lower().endswith(IMAGE_SUFFIXES)}
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            key = p.relative_to(root).as_posix()
            if not name.lower().endswith(IMAGE_SUFFIXES):
                if not (name.endswith(".txt") and name[:-4] in images):  # a sidecar caption belongs to its image
                    rows.add(key, str(p), "ignored", error="not an image file (suffix)")
                continue
            error = None
            if p.is_symlink():
                try:
                    confine(root, key)
                except UnsafePathError as e:
                    error = f"symlink: {e}".replace(
                        "image path escapes the image root", "points outside the input folder"
                    )
            error = error or regular_file_error(p) or _file_size_error(p, opts)
            caption = None
            txt = Path(name).stem + ".txt"
            if error is None and txt in names:
                try:
                    caption = (Path(dirpath) / txt).read_text(encoding="utf-8", errors="replace").strip()
                except OSError:
                    caption = None
            rows.add(key, str(p), "error" if error else "file", str(p.absolute()), caption=caption, error=error)
        for name in dirnames:  # os.walk lists a linked folder here but never enters it: one row says why
            p = Path(dirpath) / name
            if p.is_symlink():
                rows.add(p.relative_to(root).as_posix(), str(p), "ignored", error=_linked_folder(root, p))
        dirnames[:] = walk_into


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


def _scan_tar(path: Path, rows: _Rows, opts: SourceOptions) -> None:
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
    problem = problem or _tar_end_problem(path, end)
    groups: dict[str, list[tuple[tarfile.TarInfo, str]]] = {}
    abspath = str(path.absolute())
    for m in members:
        match = _WDS_SPLIT.match(m.name)
        if not match:
            rows.add(m.name, f"{path}:{m.name}", "ignored", error="member name has no KEY.EXT form")
            continue
        groups.setdefault(match.group(1), []).append((m, match.group(2).lower()))
    for key, group in groups.items():
        images = [(m, ext) for m, ext in group if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS]
        caps = [(m, ext) for m, ext in group if ext in ("txt", "json") and m.isfile()]
        cap = next((c for c in caps if c[1] == "txt"), None) or (caps[0] if caps else None)
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
        for m, _ in images:
            if not m.isfile():
                rows.add(
                    key,
                    f"{path}:{m.name}",
                    "error",
                    error=f"tar member {m.name!r} is a link or special file, not image data",
                )
                continue
            big = too_big(m.size, opts, f"tar member {m.name!r}")
            if big:
                rows.add(key, f"{path}:{m.name}", "error", error=big)
                continue
            kind, offset, size = _tar_span(m)
            cm = cap[0] if cap and cap[0].size <= opts.max_read_bytes else None  # a bad caption never fails an image
            cap_kind, cap_offset, cap_size = _tar_span(cm) if cm else ("", -1, -1)
            if cm is not None and cap:
                cap_kind = ("sparse:" if cap_kind == "tar-sparse" else "") + cap[1]
            rows.add(key, f"{path}:{m.name}", kind, abspath, offset, size, cap_offset, cap_size, cap_kind)
    if problem:
        rows.add(f"{path.name}#truncated", f"{path}", "input", error=f"{path}: {problem}")


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{path}: no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    return next((c for c in defaults if c in names), None)


def _column_bytes(md, column: str) -> int:
    """Uncompressed bytes of ``column`` (all its leaves: a ``{bytes, path}`` struct has two) in one
    row group, from the footer: known before a byte of it is read or decompressed."""
    leaves = (md.column(j) for j in range(md.num_columns))
    return sum(
        c.total_uncompressed_size
        for c in leaves
        if c.path_in_schema == column or c.path_in_schema.startswith(column + ".")
    )


def _scan_parquet(path: Path, rows: _Rows, opts: SourceOptions) -> None:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for non-Parquet files
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    img_col = _pick(names, opts.image_column, PARQUET_IMAGE_COLUMNS, "image", path)
    if img_col is None:
        raise SourceError(f"{path}: no image bytes column among {', '.join(names)}; pass --image-column")
    key_col = _pick(names, opts.key_column, PARQUET_KEY_COLUMNS, "key", path)
    cap_col = _pick(names, opts.caption_column, PARQUET_CAPTION_COLUMNS, "caption", path)
    abspath = str(path.absolute())
    row = 0
    for rg in range(pf.num_row_groups):
        cols = [c for c in (key_col, cap_col) if c]
        t = pf.read_row_group(rg, columns=cols) if cols else None
        md = pf.metadata.row_group(rg)
        n = md.num_rows
        keys = t.column(key_col).to_pylist() if t is not None and key_col else [None] * n
        caps = t.column(cap_col).to_pylist() if t is not None and cap_col else [None] * n
        big = too_big(
            _column_bytes(md, img_col),
            opts,
            f"row group {rg} of column {img_col!r} ({n} rows; the reader reads a row group at once)",
        )
        if big:
            big += "; write the file with smaller row groups (pyarrow row_group_size)"
        for i in range(n):
            key = str(keys[i]) if keys[i] is not None else f"{path.name}/{row + i}"
            cap = None if caps[i] is None else str(caps[i])
            if big:
                rows.add(key, f"{path}#row={row + i}", "error", error=big)
                continue
            rows.add(key, f"{path}#row={row + i}", "parquet", abspath, rg, i, caption=cap, image_column=img_col)
        row += n


def _scan_llava(path: Path, rows: _Rows, opts: SourceOptions) -> None:
    image_root = opts.image_root
    if image_root is None:
        raise SourceError(f"{path}: a LLaVA JSON input needs --image-root (the folder its image paths are relative to)")
    root = Path(image_root)
    if not root.is_dir():
        raise SourceError(f"--image-root {image_root} is not a folder")
    try:
        records = read_llava_records(path)
    except LlavaJSONError as e:
        raise SourceError(str(e)) from None
    seen: set[str] = set()
    for rec in records:
        images = rec.get("image") if isinstance(rec, dict) else None
        for image in images if isinstance(images, list) else [images]:
            if not isinstance(image, str) or not image or image in seen:
                continue  # no image, or the same image referenced again: one input image
            seen.add(image)
            try:
                target = str(confine(root, image))
                error = regular_file_error(target)
                if error and not os.path.lexists(target):
                    error = "no such image file under --image-root"
                error = error or _file_size_error(target, opts)
            except UnsafePathError as e:
                target, error = "", str(e).replace("the image root", "--image-root")
            rows.add(image, f"{path}:{image}", "error" if error else "file", target, error=error)


def discover(inputs: list[str], opts: SourceOptions) -> tuple[pa.Table, list[dict]]:
    """-> (plan table in input order, one ``{path, format}`` per expanded input)."""
    rows = _Rows()
    described = []
    formats = input_formats()
    for path in expand_inputs(inputs):
        fmt = detect_format(path) if opts.input_format == "auto" else opts.input_format
        formats[fmt].scan(path, rows, opts)
        described.append({"path": str(path.absolute()), "format": fmt})
    return rows.table(), described


register_input_format(
    InputFormat(
        "folder",
        "images found recursively; key = path relative to the folder (posix)",
        _scan_folder,
    )
)
register_input_format(
    InputFormat(
        "webdataset",
        "*.tar webdataset shards, brace patterns allowed: 'data/shard-{000000..000099}.tar'; "
        "key = __key__ (name up to the first dot), every member ending in an image suffix is an image "
        "(a repeated key is a duplicate), caption from txt or json 'caption'",
        _scan_tar,
    )
)
register_input_format(
    InputFormat(
        "parquet", "*.parquet, one image per row (--image-column, --key-column, --caption-column)", _scan_parquet
    )
)
register_input_format(
    InputFormat(
        "llava",
        "*.json/.jsonl LLaVA conversations; each distinct 'image' once, read under --image-root",
        _scan_llava,
    )
)
