"""The faiss index of ``asvr-tokenizer index`` (:mod:`asvr.tokenizer.codes.retrieval`): which
kind for how many vectors, its search parameters, and its files on disk (``index.json`` the
commit point, a generation of ``index.<gen>.faiss`` + ``keys.<gen>.parquet``, checked against
the digests ``index.json`` records).  Split from ``retrieval.py`` (vectors, build, search) in
issue 21: files under 400 lines.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.errors import AsvrError
from asvr.core.atomic import atomic_path, atomic_write

INDEX_JSON = "index.json"
INDEX_FORMAT = 1
RECIPE = "mean-decoded-l2"
EXACT_LIMIT = 100_000
DIGEST_SPAN = 1 << 20


class RetrievalError(AsvrError):
    """Bad index, shards or query: printed as one line by the CLI."""


# --------------------------------------------------------------------------- index choice
@dataclass(frozen=True)
class IndexPlan:
    factory: str
    search_params: dict[str, float]
    train_size: int = 0
    """vectors to train on (0: the index needs no training)."""


def _pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: ~8 dims each, and m must divide dim."""
    target = max(1, dim // 8)
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - target), -m))


def plan_index(n: int, dim: int, kind: str | None = None) -> IndexPlan:
    """The factory for ``n`` vectors of ``dim`` (``kind`` forces flat/hnsw/ivfpq, parameters still from ``n``)."""
    kind = kind or ("flat" if n < EXACT_LIMIT else "ivfpq")
    if kind == "flat":
        return IndexPlan("Flat", {})
    if kind == "hnsw":
        return IndexPlan("HNSW32,Flat", {"efSearch": 128})
    if kind == "ivfpq":
        nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(max(n, 1)))))
        train = int(min(n, max(64 * nlist, 256 * 64)))
        return IndexPlan(
            f"IVF{nlist},PQ{_pq_m(dim)},Refine(SQ8)", {"nprobe": max(16, nlist // 64), "k_factor": 4}, train
        )
    raise RetrievalError(f"unknown index kind {kind!r} (flat, hnsw, ivfpq)")


def parse_search_params(text: str | None) -> dict[str, float]:
    """``"nprobe=32,efSearch=128,k_factor=4"`` -> dict."""
    out: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        name, eq, val = part.partition("=")
        if not eq or name.strip() not in ("nprobe", "efSearch", "k_factor"):
            raise RetrievalError(f"bad search parameter {part!r} (use nprobe=N, efSearch=N, k_factor=F)")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise RetrievalError(f"bad search parameter {part!r}: {val!r} is not a number") from None
    return out


def default_search_params(index) -> dict[str, float]:
    import faiss

    p: dict[str, float] = {}
    ivf = _find_ivf(index)
    if ivf is not None:
        p["nprobe"] = max(16, ivf.nlist // 64)
    if _find(index, faiss.IndexHNSW) is not None:
        p["efSearch"] = 128
    if _find(index, faiss.IndexRefine) is not None:
        p["k_factor"] = 4
    return p


def _find(index, cls):
    import faiss

    while index is not None:
        index = faiss.downcast_index(index)
        if isinstance(index, cls):
            return index
        index = getattr(index, "base_index", None)
    return None


def _find_ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def apply_search_params(index, params: dict[str, float]) -> None:
    import faiss

    if "nprobe" in params and (ivf := _find_ivf(index)) is not None:
        ivf.nprobe = int(params["nprobe"])
    if "efSearch" in params and (h := _find(index, faiss.IndexHNSW)) is not None:
        h.hnsw.efSearch = int(params["efSearch"])
    if "k_factor" in params and (r := _find(index, faiss.IndexRefine)) is not None:
        r.k_factor = float(params["k_factor"])


def new_faiss_index(factory: str, dim: int):
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RetrievalError(
            f"faiss cannot build {factory!r} for {dim}-d vectors: {str(e).splitlines()[-1][:200]}"
        ) from None
    ivf = _find_ivf(index)
    for part in (ivf and faiss.downcast_index(ivf), _find(index, faiss.IndexPQ)):
        if part is not None and hasattr(part, "do_polysemous_training"):
            # the factory turns on polysemous training (Hamming filtering we never use): 10x the PQ training time
            part.do_polysemous_training = False
    if (h := _find(index, faiss.IndexHNSW)) is not None:
        h.hnsw.efConstruction = 80  # wider build beam than faiss's 40: a better graph for a slower build
    return index


def train_size_for(index, n: int) -> int:
    """How many vectors an untrained index wants (IVF: 64 per list, PQ: 64 per centroid of 256)."""
    if index.is_trained:
        return 0
    ivf = _find_ivf(index)
    want = max(64 * (ivf.nlist if ivf is not None else 1), 256 * 64)
    return int(min(n, want))


# --------------------------------------------------------------------------- metadata
@dataclass
class ShardEntry:
    name: str
    sha256: str
    path: str
    rows: int
    first_id: int


@dataclass
class IndexMeta:
    fingerprint: str
    tokenizer: str
    preprocess: str
    grid: tuple[int, int]
    depth: int
    codebook_size: int
    dim: int
    factory: str
    search_params: dict[str, float]
    count: int = 0
    shards: list[ShardEntry] = field(default_factory=list)
    generation: int = 0
    recipe: str = RECIPE
    format_version: int = INDEX_FORMAT
    index_digest: str = ""
    """:func:`file_digest` of the .faiss file ("" in indexes written before it was recorded)."""
    keys_digest: str = ""

    @property
    def index_file(self) -> str:
        return f"index.{self.generation:05d}.faiss"

    @property
    def keys_file(self) -> str:
        return f"keys.{self.generation:05d}.parquet"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["index_file"], d["keys_file"] = self.index_file, self.keys_file
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IndexMeta":
        if d.get("format_version") != INDEX_FORMAT or d.get("recipe") != RECIPE:
            raise RetrievalError(
                f"index format {d.get('format_version')}/{d.get('recipe')} is not {INDEX_FORMAT}/{RECIPE}"
            )
        d = {k: v for k, v in d.items() if k not in ("index_file", "keys_file")}
        d["grid"] = tuple(d["grid"])
        d["shards"] = [ShardEntry(**s) for s in d["shards"]]
        return cls(**d)


def read_index_meta(idx_dir: str | os.PathLike) -> IndexMeta:
    p = Path(idx_dir) / INDEX_JSON
    if not p.exists():
        raise RetrievalError(f"{idx_dir} is not an index directory (no {INDEX_JSON})")
    try:
        return IndexMeta.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise RetrievalError(f"{p}: malformed ({e})") from None


KEYS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int32()), ("row", pa.int64())])


def file_digest(path: str | os.PathLike) -> str:
    """sha256 over a file's size, first and last MiB: tells this index's files from any other
    (a .faiss header holds the vector count and dimension, the tail the last vectors) at a fixed
    cost; a full hash would read all of a 10 GB index before every query."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode() + b"\0" + f.read(DIGEST_SPAN))
        if size > DIGEST_SPAN:
            f.seek(max(DIGEST_SPAN, size - DIGEST_SPAN))
            h.update(f.read(DIGEST_SPAN))
    return h.hexdigest()


def load_index_files(idx_dir: Path, meta: IndexMeta) -> tuple[Any, pa.Table]:
    """-> (faiss index, keys table) named by ``meta``, refused (one line) unless they are the ones
    ``index.json`` recorded: readable, the recorded digests, dimension and vector count."""
    import faiss

    ipath, kpath = idx_dir / meta.index_file, idx_dir / meta.keys_file
    for p, want in ((ipath, meta.index_digest), (kpath, meta.keys_digest)):
        if not p.is_file():
            raise RetrievalError(f"{p}: missing (named by {idx_dir / INDEX_JSON})")
        if want and file_digest(p) != want:
            raise RetrievalError(
                f"{p} is not the file {INDEX_JSON} recorded (replaced or modified); rebuild the index with --force"
            )
    try:
        index = faiss.read_index(str(ipath))
    except RuntimeError as e:
        raise RetrievalError(f"{ipath}: cannot read ({str(e).splitlines()[-1][:120]})") from None
    try:
        keys = pq.read_table(kpath)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a cut or foreign file
        raise RetrievalError(f"{kpath}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if keys.schema.names[:3] != KEYS_SCHEMA.names:
        raise RetrievalError(f"{kpath}: not an index keys file (columns {keys.schema.names})")
    if int(index.d) != meta.dim or int(index.ntotal) != meta.count or keys.num_rows != meta.count:
        raise RetrievalError(
            f"{ipath}: holds {int(index.ntotal)} vectors of dimension {int(index.d)} and its keys file "
            f"{keys.num_rows} rows, {INDEX_JSON} says {meta.count} of {meta.dim}: not this index's files; "
            "rebuild it with --force"
        )
    return index, keys


def save_index(idx_dir: Path, meta: IndexMeta, index, keys: pa.Table) -> None:
    """Write a new generation, then commit it by replacing index.json; old generations are removed."""
    import faiss

    idx_dir.mkdir(parents=True, exist_ok=True)
    old = {p.name for p in idx_dir.glob("index.*.faiss")} | {p.name for p in idx_dir.glob("keys.*.parquet")}
    meta.generation += 1
    meta.count = int(index.ntotal)
    with atomic_path(idx_dir / meta.index_file) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(idx_dir / meta.keys_file) as tmp:
        pq.write_table(keys, tmp)
    meta.index_digest = file_digest(idx_dir / meta.index_file)
    meta.keys_digest = file_digest(idx_dir / meta.keys_file)
    atomic_write(idx_dir / INDEX_JSON, json.dumps(meta.to_dict(), indent=2) + "\n")
    for name in old - {meta.index_file, meta.keys_file}:
        (idx_dir / name).unlink(missing_ok=True)
