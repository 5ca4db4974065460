"""Packed shards (contract 3): training rows already rendered, tokenized, labelled and packed.

The format is a contract between ``asvr-pipeline pack`` (writes) and ``asvr-train --packed``
(streams), so it lives in the torch-free base next to the code shards (:mod:`asvr.core.shards`).

``packed-NNNNN.parquet``, one row per *packed row* of at most ``max_len`` tokens:

* ``input_ids`` list<int32>, ``labels`` list<int32> (-100: no text loss), same length ``L``;
* ``sample_ids`` list<string> (the samples in the row, in order; ``caption-free:KEY`` for the
  visual-only ones) and ``sample_offsets`` list<int32> (``n + 1`` offsets: sample ``i`` is
  ``[off[i], off[i+1])``; position ids restart at each offset);
* ``image_keys`` list<string> (one per image, in row order; the key into the code shards, which
  the ``online``/``features`` vision inputs also use to find the image), ``image_offsets``
  list<int32> (each image fills ``image_tokens`` positions from there),
* ``codes`` list<uint16> (the images' visual targets, ``n_images * H*W*D`` values, row-major).

Schema metadata (``asvr.packed.*``, JSON): the code shards' :class:`ShardMeta` fields
(fingerprint, grid, depth, codebook_size, preprocess) plus ``text_tokenizer`` (sha256 of the
LLM tokenizer, :func:`asvr.train.data.packed_build.text_tokenizer_hash`), ``template``,
``max_len``, ``image_tokens`` and ``version``.  A reader compares them with its run in one line
(:func:`check_packed_meta`).  Rows are written in row groups of :data:`ROW_GROUP` rows, the
reader's unit of read-ahead.
"""

from __future__ import annotations

from asvr.core.errors import AsvrError

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.shards import ShardError, ShardMeta, _finish

VERSION = 1
ROW_GROUP = 64
PREFIX, SUFFIX = "packed-", ".parquet"
COLUMNS = ("input_ids", "labels", "sample_ids", "sample_offsets", "image_keys", "image_offsets", "codes")


class PackedError(AsvrError):
    """Packed shards that cannot be used by this run; the message is one line naming the file."""


@dataclass(frozen=True)
class PackedMeta:
    fingerprint: str
    grid: tuple[int, int]
    depth: int
    codebook_size: int
    preprocess: str
    text_tokenizer: str
    template: str
    max_len: int
    image_tokens: int
    version: int = VERSION

    @property
    def codes_per_image(self) -> int:
        return self.grid[0] * self.grid[1] * self.depth

    @classmethod
    def from_shards(cls, meta: ShardMeta, **kw: Any) -> "PackedMeta":
        return cls(**asdict(meta), **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    def to_metadata(self) -> dict[bytes, bytes]:
        return {f"asvr.packed.{k}".encode(): json.dumps(v).encode() for k, v in self.to_dict().items()}

    @classmethod
    def from_metadata(cls, md: dict[bytes, bytes] | None, where: str) -> "PackedMeta":
        md = md or {}
        try:
            d = {k: json.loads(md[f"asvr.packed.{k}".encode()]) for k in cls.__dataclass_fields__}
        except KeyError as e:
            raise PackedError(f"{where}: not an ASVR packed shard (schema metadata lacks {e.args[0]})") from None
        d["grid"] = tuple(d["grid"])
        return cls(**d)


def packed_schema(meta: PackedMeta) -> pa.Schema:
    i32 = pa.list_(pa.int32())
    return pa.schema(
        [
            ("input_ids", i32),
            ("labels", i32),
            ("sample_ids", pa.list_(pa.string())),
            ("sample_offsets", i32),
            ("image_keys", pa.list_(pa.string())),
            ("image_offsets", i32),
            ("codes", pa.list_(pa.uint16())),
        ],
        metadata=meta.to_metadata(),
    )


def rows_to_table(meta: PackedMeta, rows: dict[str, list]) -> pa.Table:
    """``rows``: one list per :data:`COLUMNS` entry (numpy arrays or lists per packed row)."""
    schema = packed_schema(meta)
    arrays = []
    for f in schema:
        col = rows[f.name]
        if f.name == "codes":
            arrays.append(pa.array([np.asarray(c, np.uint16).reshape(-1) for c in col], f.type))
        elif f.type.value_type == pa.int32():
            arrays.append(pa.array([np.asarray(c, np.int32) for c in col], f.type))
        else:
            arrays.append(pa.array(col, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_packed_shard(path: str | os.PathLike, table: pa.Table) -> str:
    """Atomic (temp name, fsync, rename); deterministic bytes for the same rows. Returns the sha256."""
    return _finish(Path(path), lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP))


def list_packed(folder: str | os.PathLike) -> list[Path]:
    files = sorted(Path(folder).glob(f"{PREFIX}*{SUFFIX}"))
    if not files:
        raise PackedError(f"{folder}: no {PREFIX}*{SUFFIX} shards (make them with asvr-pipeline pack)")
    return files


def open_packed(path: str | os.PathLike) -> tuple[PackedMeta, pq.ParquetFile]:
    """The shard's footer only (metadata, row groups); an unreadable file is one line naming it."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - truncated/damaged: whatever pyarrow raises
        raise PackedError(f"{path}: unreadable packed shard ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    meta = PackedMeta.from_metadata(pf.schema_arrow.metadata, str(path))
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise PackedError(f"{path}: packed shard lacks columns {missing}")
    return meta, pf


def read_row_group(path: str | os.PathLike, pf: pq.ParquetFile, group: int) -> pa.Table:
    try:
        return pf.read_row_group(group)
    except Exception as e:  # noqa: BLE001
        raise PackedError(
            f"{path}: unreadable packed shard, row group {group} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def check_packed_meta(where: str, got: PackedMeta, want: dict[str, Any]) -> None:
    """Refuse packed shards made for another run: one line naming the file and every difference.
    ``want``: the fields this run fixes (e.g. fingerprint, text_tokenizer, template, max_len)."""
    have = got.to_dict()
    diff = [k for k, v in want.items() if v is not None and have.get(k) != (list(v) if isinstance(v, tuple) else v)]
    if diff:
        what = "; ".join(f"{k} {have.get(k)!r:.40} there, {want[k]!r:.40} here" for k in diff)
        raise PackedError(f"{where}: packed for another run ({what}); pack the data again for this run")


__all__ = [
    "COLUMNS",
    "PackedError",
    "PackedMeta",
    "ShardError",
    "check_packed_meta",
    "list_packed",
    "open_packed",
    "packed_schema",
    "read_row_group",
    "rows_to_table",
    "write_packed_shard",
]
