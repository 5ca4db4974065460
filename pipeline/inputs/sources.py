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

Formats are a registry of :class:`InputFormat` plug-ins, and the built-ins are
written as plug-ins too, one module each: ``folder.py`` (recursive, dotfiles
skipped, ``<stem>.txt`` beside an image is its caption), ``webdataset.py``
(uncompressed ``.tar``; key = ``__key__``), ``parquet.py`` (image bytes column,
raw binary or a Hugging Face ``{bytes, path}`` struct), ``llava_json.py``
(``.json`` / ``.jsonl`` records with an ``image`` string or list) and
``hf_datasets.py``.  This module keeps what they share: the plan schema and
:class:`_Rows`, :class:`SourceOptions`, the registry, INPUT expansion,
detection and :func:`discover`.

Adding a format is one module in ``asvr/pipeline/inputs/`` (and its test)
that calls :func:`register_input_format` with an :class:`InputFormat`: how to
recognise an INPUT, how to add its images to the plan, and, when its rows need
a reader of their own, a ``kind`` -> reader function.  Every module of the
package is imported by :func:`input_formats` on its first call, so the CLI's
``--input-format`` choices, auto-detection and the Ray read stage all see it.
Detection asks the formats without ``detect_last`` first (plug-ins that
recognise a layout), then the built-ins' suffix rules in the order folder,
webdataset, parquet, llava.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from asvr.core.registry import Registry
from asvr.core.errors import AsvrError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "image_bytes", "bytes", "img")
PARQUET_KEY_COLUMNS = ("key", "__key__", "id", "path", "file_name", "filename")
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt")
DEFAULT_MAX_READ_BYTES = 256 * 2**20
"""Half of a decode task's memory reservation (``runner.DECODE_TASK_MEMORY``, 512 MiB): the bytes
read, and their one copy as a Python ``bytes``, fit beside the decoded image."""

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
    ``detect(path)`` says whether an INPUT is of this format (formats with ``detect_last`` are asked
    after the others: the built-ins' suffix rules are generic, so a plug-in recognising a special
    layout, such as a folder of Arrow files, claims its INPUT first); ``readers`` maps a
    plan-row ``kind`` this format emits to ``read(row, handles) -> image bytes``, where
    ``handles`` is a per-block dict for open files (raise :class:`ImageError` for one bad image)."""

    name: str
    help: str
    scan: Callable[[Path, "_Rows", "SourceOptions"], None]
    detect: Callable[[Path], bool] | None = None
    readers: dict[str, Callable[[dict, dict], bytes]] = field(default_factory=dict)
    detect_last: bool = False


FORMATS: Registry[InputFormat] = Registry(
    "input format", "asvr.pipeline.inputs", "", reserved=("auto",), first=("folder", "webdataset", "parquet", "llava")
)


def register_input_format(fmt: InputFormat) -> InputFormat:
    clash = [k for k in fmt.readers for f in FORMATS.registered() if k in f.readers] + [
        k for k in fmt.readers if k in ("file", "tar", "tar-sparse", "parquet", "error", "input", "ignored")
    ]
    if clash:
        raise ValueError(f"input format {fmt.name!r}: row kind {clash[0]!r} already has a reader")
    return FORMATS.register(fmt.name, fmt)


def input_formats() -> dict[str, InputFormat]:
    """name -> format: every module of ``asvr.pipeline.inputs`` (imported once), built-ins first."""
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


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str | None:
    """The column ``wanted`` (which must exist), else the first of ``defaults`` present, else None."""
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{path}: no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    return next((c for c in defaults if c in names), None)


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
    formats = list(input_formats().values())
    for fmt in [f for f in formats if not f.detect_last] + [f for f in formats if f.detect_last]:
        if fmt.detect is not None and fmt.detect(path):
            return fmt.name
    raise SourceError(f"{path}: cannot tell its format (folder, .tar, .parquet, .json); pass --input-format")


# --------------------------------------------------------------------------- discovery
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
