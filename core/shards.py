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

Webdataset: ``shard-NNNNN.tar`` with positional member names, as img2dataset
writes them: ``NNNNN_RRRRRR.codes.npy`` (uint16 [H, W, D]) and
``NNNNN_RRRRRR.json`` (key, sha256, width, height, caption, and the same
metadata), ``RRRRRR`` the row in the shard.  The key lives only inside the JSON:
a key such as ``../../x`` never becomes a member path that ``tar -x`` writes
outside its folder, and ``x.jpg`` / ``x.png`` are two samples, not one sample
that a webdataset reader splits at the first dot.

One image's row is a :class:`ShardRow` (a NamedTuple: 1.2 us to build against
2.3 us for a frozen slotted dataclass, and 1000 rows transpose to columns in
0.07 ms against 0.9 ms; the encode actor builds one per image).  The Parquet
schema, the webdataset JSON and both readers are written from its fields and
:data:`_COLUMN_TYPES`, so a new column is one field with a default (what a shard
written before it reads as) and one type here, plus the place that fills it
(:mod:`asvr.pipeline.job.unit_stages`).

Readers check what they open: an unreadable or truncated file is a
:class:`ShardError` naming it, and every code is checked against the codebook
size when a shard is read (one vectorised pass, ~1 ms per 10k rows at 27x27x8),
so a bad row is refused with its file and key before training starts instead of
failing with an ``IndexError`` whenever it is first sampled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.atomic import atomic_path
from asvr.core.errors import AsvrError, check_fingerprint

MANIFEST = "manifest.json"
FAILURES = "failures.parquet"


class ShardError(AsvrError):
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
            return cls(
                fingerprint=get("fingerprint"),
                grid=tuple(get("grid")),
                depth=int(get("depth")),
                codebook_size=int(get("codebook_size")),
                preprocess=get("preprocess"),
            )
        except KeyError as e:
            raise ShardError(f"{where}: not an ASVR code shard (schema metadata lacks {e.args[0]})") from None

    @classmethod
    def from_spec(cls, spec, preprocess: str | None = None) -> "ShardMeta":
        """From a :class:`asvr.tokenizer.TokenizerSpec`."""
        return cls(
            fingerprint=spec.fingerprint,
            grid=tuple(spec.grid),
            depth=spec.depth,
            codebook_size=spec.codebook_size,
            preprocess=preprocess or spec.preprocess,
        )


class ShardRow(NamedTuple):
    """One image of a code shard: the shard's columns, in order."""

    key: str
    codes: np.ndarray
    """uint16-compatible ``[H, W, D]`` or ``[H*W*D]`` (row-major h, w, d)."""
    sha256: str
    """Of the image file's bytes."""
    width: int
    height: int
    """Of the original image."""
    caption: str | None = None


_COLUMN_TYPES: dict[str, tuple[pa.DataType, bool]] = {
    "key": (pa.string(), False),
    "sha256": (pa.string(), True),
    "width": (pa.int32(), True),
    "height": (pa.int32(), True),
    "caption": (pa.string(), True),
}
"""Arrow type and nullability of every :class:`ShardRow` field but ``codes``."""
VALUE_COLUMNS = tuple(f for f in ShardRow._fields if f not in ("key", "codes"))
"""The columns after ``key`` and ``codes``, in order (the webdataset JSON carries them with the key)."""


def shard_schema(meta: ShardMeta) -> pa.Schema:
    fields = [
        pa.field(name, pa.list_(pa.uint16(), meta.codes_per_image), nullable=False)
        if name == "codes"
        else pa.field(name, _COLUMN_TYPES[name][0], nullable=_COLUMN_TYPES[name][1])
        for name in ShardRow._fields
    ]
    return pa.schema(fields, metadata=meta.to_metadata())


def rows_table(meta: ShardMeta, rows: Sequence[ShardRow]) -> pa.Table:
    """:class:`ShardRow` list -> a table with the shard schema (codes range-checked)."""
    if not rows:
        return rows_to_table(meta, [], np.zeros((0, meta.codes_per_image)), *([[]] * len(VALUE_COLUMNS)))
    cols = list(zip(*rows))
    return rows_to_table(meta, cols[0], np.stack([np.asarray(c).reshape(-1) for c in cols[1]]), *cols[2:])


def rows_to_table(meta: ShardMeta, keys, codes: np.ndarray, *columns: Sequence) -> pa.Table:
    """The column form: keys, codes (uint16-compatible ``[N, H, W, D]`` or ``[N, H*W*D]``), then the
    :data:`VALUE_COLUMNS` in order (sha256s, widths, heights, captions); a column left off at the end
    holds its field's default."""
    n = len(keys)
    flat = np.ascontiguousarray(np.asarray(codes).reshape(n, -1) if n else np.zeros((0, meta.codes_per_image)))
    if flat.shape[1] != meta.codes_per_image:
        raise ShardError(f"codes have {flat.shape[1]} values per image, shards want {meta.codes_per_image}")
    if flat.size and (flat.min() < 0 or flat.max() >= meta.codebook_size):
        raise ShardError("codes out of range for the codebook size")
    if len(columns) > len(VALUE_COLUMNS):
        raise ShardError(f"{len(columns)} value columns, shards have {len(VALUE_COLUMNS)} ({', '.join(VALUE_COLUMNS)})")
    values = pa.array(flat.astype(np.uint16).reshape(-1), type=pa.uint16())
    arrays = [
        pa.array(list(keys), pa.string()),
        pa.FixedSizeListArray.from_arrays(values, meta.codes_per_image),
    ]
    for i, name in enumerate(VALUE_COLUMNS):
        if i < len(columns):
            col = list(columns[i])
        elif name in ShardRow._field_defaults:
            col = [ShardRow._field_defaults[name]] * n
        else:
            raise ShardError(f"no {name} column")
        arrays.append(pa.array(col, _COLUMN_TYPES[name][0]))
    return pa.Table.from_arrays(arrays, schema=shard_schema(meta))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _finish(path: Path, write) -> str:
    """``write(tmp)`` through the atomic helper (fsync, rename; the temp file never outlives a
    failure such as a full disk); returns the sha256 of what was written."""
    with atomic_path(path) as tmp:
        write(tmp)
        digest = sha256_file(tmp)
    return digest


def write_parquet_shard(path: str | os.PathLike, table: pa.Table) -> str:
    """Write atomically (temp name, fsync, rename). Returns the file's sha256."""
    path = Path(path)
    return _finish(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_webdataset_shard(path: str | os.PathLike, table: pa.Table, shard: int | None = None) -> str:
    """Same rows as a tar of ``NNNNN_RRRRRR.codes.npy`` + ``NNNNN_RRRRRR.json``; atomic. Returns sha256.

    ``shard``: the NNNNN of the member names (default: the number in the file name)."""
    path = Path(path)
    meta = ShardMeta.from_metadata(table.schema.metadata)
    if shard is None:
        digits = re.findall(r"\d+", path.stem)
        shard = int(digits[-1]) if digits else 0
    codes = codes_array(table, meta)
    cols = table.select(["key", *VALUE_COLUMNS]).to_pylist()

    def write(tmp):
        with tarfile.open(tmp, "w") as tar:
            for r, (row, c) in enumerate(zip(cols, codes)):
                buf = io.BytesIO()
                np.save(buf, c.astype(np.uint16))
                info = dict(row, **asdict(meta))
                info["grid"] = list(meta.grid)
                for suffix, data in ((".codes.npy", buf.getvalue()), (".json", json.dumps(info).encode())):
                    ti = tarfile.TarInfo(f"{shard:05d}_{r:06d}{suffix}")
                    ti.size = len(data)
                    ti.mtime = 0
                    tar.addfile(ti, io.BytesIO(data))

    return _finish(path, write)


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
    try:
        if path.suffix == ".parquet":
            return ShardMeta.from_metadata(pq.read_schema(path).metadata, str(path))
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json") and m.isfile():
                    return _meta_of(json.loads(_member(tar, m)))
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow/tarfile/json raise many types for a damaged file
        raise ShardError(f"{path}: unreadable code shard ({_why(e)})") from None
    raise ShardError(f"{path}: empty webdataset shard")


def _meta_of(info: dict) -> ShardMeta:
    return ShardMeta(
        fingerprint=info["fingerprint"],
        grid=tuple(info["grid"]),
        depth=int(info["depth"]),
        codebook_size=int(info["codebook_size"]),
        preprocess=info["preprocess"],
    )


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def check_code_range(path, meta: ShardMeta, keys, flat: np.ndarray) -> None:
    """Refuse a shard holding a code outside ``[0, K)``, naming the file and the first bad key.
    One vectorised pass (``max``); the per-row search runs only when something is wrong."""
    if flat.size and int(flat.max()) >= meta.codebook_size:
        row = int(np.argmax(flat.reshape(len(keys), -1).max(axis=1) >= meta.codebook_size))
        raise ShardError(
            f"{path}: key {keys[row]!r} has code {int(flat.reshape(len(keys), -1)[row].max())} "
            f"outside [0, {meta.codebook_size}) (codebook size); the shard is corrupt"
        )


def read_shard(path: str | os.PathLike) -> tuple[ShardMeta, pa.Table]:
    """One shard as a table with the Parquet schema (webdataset is converted); codes range-checked."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            meta = ShardMeta.from_metadata(table.schema.metadata, str(path))
            col = table.column("codes").combine_chunks()
            flat = col.values.to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.uint16)
            check_code_range(path, meta, table.column("key").to_pylist() if flat.size else [], flat)
            return meta, table
        meta = read_meta(path)
        npys, infos = {}, {}
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.name.endswith(".codes.npy"):
                    npys[m.name[: -len(".codes.npy")]] = np.load(io.BytesIO(_member(tar, m)))
                elif m.name.endswith(".json"):
                    infos[m.name[: -len(".json")]] = json.loads(_member(tar, m))
        names = sorted(npys)
        keys = [infos[n].get("key", n) for n in names]  # files before contract 2's update: key = member name
        codes_np = np.stack([npys[n] for n in names]) if names else np.zeros((0, *meta.grid, meta.depth), np.uint16)
        check_code_range(path, meta, keys, codes_np)
        rest = [infos[n] for n in names]
        defaults = ShardRow._field_defaults  # a column newer than the shard reads as its default
        columns = [[r[c] if c not in defaults else r.get(c, defaults[c]) for r in rest] for c in VALUE_COLUMNS]
        return meta, rows_to_table(meta, keys, codes_np, *columns)
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file, whatever the library raises
        raise ShardError(f"{path}: unreadable code shard ({_why(e)})") from None


def iter_shards(out: str | os.PathLike, fingerprint: str | None = None) -> Iterator[tuple[Path, ShardMeta, pa.Table]]:
    """All shards of an output directory; refuses a foreign tokenizer fingerprint."""
    for path in list_shards(out):
        meta, table = read_shard(path)
        if fingerprint is not None:
            check_fingerprint(
                meta.fingerprint,
                fingerprint,
                str(path),
                "this run's tokenizer",
                "tokenize the images again with this tokenizer",
            )
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
