"""Code shards (docs/ARCHITECTURE.md, contract 2): schema, atomic writers and readers.

The shard format belongs to the base package: the pipeline writes shards,
the index, the inspector, the trainer and eval read them, and none of them
imports another for it.  Imports only pyarrow/numpy (never Ray, never torch);
pyarrow comes with every extra that reads shards (index, pipeline, train, eval).

Parquet: ``part-NNNNN.parquet``, one row per image:
``key`` string, ``codes`` FixedSizeList<uint16>[H*W*D] (row-major h, w, d),
``sha256`` string, ``width`` int32, ``height`` int32, ``caption`` string (nullable).
Schema metadata (``asvr.*`` keys, JSON strings): fingerprint, grid, depth,
codebook_size, preprocess.

Webdataset: ``shard-NNNNN.tar`` with ``<key>.codes.npy`` (uint16 [H, W, D]) and
``<key>.json`` (sha256, width, height, caption, and the same metadata).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import check_fingerprint

MANIFEST = "manifest.json"
FAILURES = "failures.parquet"


class ShardError(ValueError):
    pass


@dataclass(frozen=True)
class ShardMeta:
    fingerprint: str
    grid: tuple[int, int]
    depth: int
    codebook_size: int
    preprocess: str

    @property
    def codes_per_image(self) -> int:
        return self.grid[0] * self.grid[1] * self.depth

    def to_metadata(self) -> dict[bytes, bytes]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return {f"asvr.{k}".encode(): json.dumps(v).encode() for k, v in d.items()}

    @classmethod
    def from_metadata(cls, md: dict[bytes, bytes] | None, where: str = "") -> "ShardMeta":
        md = md or {}
        try:
            get = lambda k: json.loads(md[f"asvr.{k}".encode()])  # noqa: E731
            return cls(fingerprint=get("fingerprint"), grid=tuple(get("grid")), depth=int(get("depth")),
                       codebook_size=int(get("codebook_size")), preprocess=get("preprocess"))
        except KeyError as e:
            raise ShardError(f"{where}: not an ASVR code shard (schema metadata lacks {e.args[0]})") from None

    @classmethod
    def from_spec(cls, spec, preprocess: str | None = None) -> "ShardMeta":
        """From a :class:`asvr.tokenizer.TokenizerSpec`."""
        return cls(fingerprint=spec.fingerprint, grid=tuple(spec.grid), depth=spec.depth,
                   codebook_size=spec.codebook_size, preprocess=preprocess or spec.preprocess)


def shard_schema(meta: ShardMeta) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("codes", pa.list_(pa.uint16(), meta.codes_per_image), nullable=False),
            pa.field("sha256", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("caption", pa.string(), nullable=True),
        ],
        metadata=meta.to_metadata(),
    )


def rows_to_table(meta: ShardMeta, keys, codes: np.ndarray, sha256s, widths, heights, captions) -> pa.Table:
    """codes: uint16-compatible ``[N, H, W, D]`` or ``[N, H*W*D]``."""
    n = len(keys)
    flat = np.ascontiguousarray(np.asarray(codes).reshape(n, -1))
    if flat.shape[1] != meta.codes_per_image:
        raise ShardError(f"codes have {flat.shape[1]} values per image, shards want {meta.codes_per_image}")
    if flat.size and (flat.min() < 0 or flat.max() >= meta.codebook_size):
        raise ShardError("codes out of range for the codebook size")
    values = pa.array(flat.astype(np.uint16).reshape(-1), type=pa.uint16())
    schema = shard_schema(meta)
    return pa.Table.from_arrays(
        [
            pa.array(list(keys), pa.string()),
            pa.FixedSizeListArray.from_arrays(values, meta.codes_per_image),
            pa.array(list(sha256s), pa.string()),
            pa.array(list(widths), pa.int32()),
            pa.array(list(heights), pa.int32()),
            pa.array(list(captions), pa.string()),
        ],
        schema=schema,
    )


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet_shard(path: str | os.PathLike, table: pa.Table) -> str:
    """Write atomically (temp name, fsync, rename). Returns the file's sha256."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        digest = sha256_file(tmp)
    return digest


def write_webdataset_shard(path: str | os.PathLike, table: pa.Table) -> str:
    """Same rows as a tar: ``<key>.codes.npy`` + ``<key>.json``; atomic. Returns sha256."""
    meta = ShardMeta.from_metadata(table.schema.metadata)
    codes = codes_array(table, meta)
    cols = table.select(["key", "sha256", "width", "height", "caption"]).to_pylist()
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for row, c in zip(cols, codes):
                key = row.pop("key")
                buf = io.BytesIO()
                np.save(buf, c.astype(np.uint16))
                info = dict(row, **{k: v for k, v in asdict(meta).items()})
                info["grid"] = list(meta.grid)
                for suffix, data in ((".codes.npy", buf.getvalue()), (".json", json.dumps(info).encode())):
                    ti = tarfile.TarInfo(key + suffix)
                    ti.size = len(data)
                    ti.mtime = 0
                    tar.addfile(ti, io.BytesIO(data))
        digest = sha256_file(tmp)
    return digest


def codes_array(table: pa.Table, meta: ShardMeta) -> np.ndarray:
    """``codes`` column -> uint16 ``[N, H, W, D]`` without a Python loop."""
    col = table.column("codes").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.uint16)
    return flat.reshape(len(col), meta.grid[0], meta.grid[1], meta.depth)


def list_shards(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    if out.is_file():
        return [out]
    files = sorted(out.glob("part-*.parquet")) + sorted(out.glob("shard-*.tar"))
    if not files:
        raise ShardError(f"{out}: no code shards (part-*.parquet or shard-*.tar)")
    return files


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(m)
    if f is None:
        raise ShardError(f"tar member {m.name!r} is not a regular file")
    return f.read()


def read_meta(path: str | os.PathLike) -> ShardMeta:
    path = Path(path)
    if path.suffix == ".parquet":
        return ShardMeta.from_metadata(pq.read_schema(path).metadata, str(path))
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith(".json"):
                info = json.loads(_member(tar, m))
                return ShardMeta(fingerprint=info["fingerprint"], grid=tuple(info["grid"]), depth=int(info["depth"]),
                                 codebook_size=int(info["codebook_size"]), preprocess=info["preprocess"])
    raise ShardError(f"{path}: empty webdataset shard")


def read_shard(path: str | os.PathLike) -> tuple[ShardMeta, pa.Table]:
    """One shard as a table with the Parquet schema (webdataset is converted)."""
    path = Path(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return ShardMeta.from_metadata(table.schema.metadata, str(path)), table
    meta = read_meta(path)
    keys, codes, rest = [], [], {}
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar if m.isfile()}
        for name in sorted(members):
            if not name.endswith(".codes.npy"):
                continue
            key = name[: -len(".codes.npy")]
            keys.append(key)
            codes.append(np.load(io.BytesIO(_member(tar, members[name]))))
            rest[key] = json.loads(_member(tar, members[key + ".json"]))
    codes_np = np.stack(codes) if codes else np.zeros((0, *meta.grid, meta.depth), np.uint16)
    table = rows_to_table(meta, keys, codes_np, [rest[k]["sha256"] for k in keys], [rest[k]["width"] for k in keys],
                          [rest[k]["height"] for k in keys], [rest[k].get("caption") for k in keys])
    return meta, table


def iter_shards(out: str | os.PathLike, fingerprint: str | None = None) -> Iterator[tuple[Path, ShardMeta, pa.Table]]:
    """All shards of an output directory; refuses a foreign tokenizer fingerprint."""
    for path in list_shards(out):
        meta, table = read_shard(path)
        if fingerprint is not None:
            check_fingerprint(meta.fingerprint, fingerprint, str(path), "this run's tokenizer",
                              "tokenize the images again with this tokenizer")
        yield path, meta, table


def load_codes(out: str | os.PathLike, fingerprint: str | None = None) -> tuple[ShardMeta, dict[str, np.ndarray]]:
    """key -> uint16 codes ``[H, W, D]`` for a whole output directory (small corpora, eval)."""
    result: dict[str, np.ndarray] = {}
    meta: ShardMeta | None = None
    for _, m, table in iter_shards(out, fingerprint):
        meta = meta or m
        for key, c in zip(table.column("key").to_pylist(), codes_array(table, m)):
            result[key] = c
    if meta is None:  # list_shards refuses an empty folder; kept for the type checker
        raise ShardError(f"{out}: no code shards")
    return meta, result
