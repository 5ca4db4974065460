"""Input format ``parquet``: one image per row.

The image column is ``--image-column``, else the first of
:data:`~asvr.pipeline.inputs.sources.PARQUET_IMAGE_COLUMNS` (raw binary or a
Hugging Face ``{bytes, path}`` struct); keys and captions come from
``--key-column`` / ``--caption-column`` or the defaults, else the key is
``<file>/<row>``.  A row group whose image column is larger uncompressed than
``--max-read-mb`` is a failure row per image, decided from the footer before a
byte of it is read (the reader reads a row group at once).

An image cell becomes bytes in one place, :func:`image_cell_bytes`, shared by the read stage
(:func:`parquet_cell_bytes`) and the ``hf-datasets`` format, each with its own reason for a cell
without bytes.

Registered like a plug-in; detected (after the plug-ins) by the ``.parquet`` suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from asvr.tokenizer.preprocess import ImageError

from asvr.pipeline.inputs.sources import (
    PARQUET_CAPTION_COLUMNS,
    PARQUET_IMAGE_COLUMNS,
    PARQUET_KEY_COLUMNS,
    InputFormat,
    SourceError,
    SourceOptions,
    _pick,
    _Rows,
    register_input_format,
    too_big,
)


def image_cell_bytes(v, why_missing: Callable[[dict | None], str]) -> bytes:
    """An image cell (raw binary, or a Hugging Face Image struct ``{bytes, path}``) -> its bytes;
    ``why_missing(struct or None)``: the read failure of a cell without bytes."""
    struct = v if isinstance(v, dict) else None
    if struct is not None:
        v = struct.get("bytes")
    if v is None:
        raise ImageError(why_missing(struct), "read")
    if not isinstance(v, (bytes, bytearray)):
        raise ImageError(f"image cell holds {type(v).__name__}, not bytes", "read")
    return bytes(v)


def _parquet_missing(struct: dict | None) -> str:
    if struct is not None and struct.get("path"):
        return (
            f"image cell is a struct with path {struct['path']!r} but no bytes: files named by a "
            "Parquet cell are not opened; embed the image bytes in the file"
        )
    return "image cell is null"


def parquet_cell_bytes(v) -> bytes:
    """An image cell of a Parquet input -> its bytes (a struct naming a file is refused: not opened)."""
    return image_cell_bytes(v, _parquet_missing)


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


register_input_format(
    InputFormat(
        "parquet",
        "*.parquet, one image per row (--image-column, --key-column, --caption-column)",
        _scan_parquet,
        detect=lambda path: path.name.lower().endswith(".parquet"),
        detect_last=True,
    )
)
