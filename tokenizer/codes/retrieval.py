"""Image retrieval over code shards: one vector per image, a faiss index, keys beside it.

Vector recipe (``mean-decoded``)
--------------------------------
An image's vector is the mean over its ``H x W`` patches of the dequantized
features ``sum_d c_d[k_{h,w,d}]``, L2-normalised, searched by inner product
(= cosine).  Because decoding is linear this equals
``sum_d (h_d / HW) @ C_d``: the per-depth bag-of-codes histograms ``h_d``
projected through the codebooks.  Against the alternatives:

* a raw bag-of-codes histogram (``D x K`` sparse, 131072-d for the published
  8 x 16384 tokenizer) treats every pair of codes as unrelated, so two photos
  of the same object that land on neighbouring codes score zero; with 729
  patches spread over 16384 codes the histograms barely overlap and their
  cosine is dominated by a few frequent codes.  The projection keeps what the
  histogram says and adds the codebook geometry, in ``C`` dense dimensions
  (1152 or 320), which is what faiss is built for.
* mean-pooled *continuous* features would need the images and the encoder;
  ours needs only the shards.  The query path (``--image``) encodes the image,
  so a corpus image gives exactly its shard codes and finds itself at cosine 1.
* deeper depths add residual detail with smaller norms, so they move the
  vector less than depth 0: the weighting the quantizer learned, for free.

What it loses: spatial layout (a mean) and multi-object structure.  It is
computed with one ``embedding_bag`` over the ``[D*K, C]`` table, never
materialising the ``[N, H, W, D, C]`` decode (27 MB per image for the
published tokenizer).

Index choice by corpus size ``N`` (``plan_index``; ``--factory`` overrides)
---------------------------------------------------------------------------
* ``N < 100k``: ``Flat`` (exact IndexFlatIP; 100k x 1152 floats = 460 MB and a
  query costs ~0.1 GFLOP, milliseconds).
* ``N >= 100k``: ``IVF{nlist},PQ{C/8},Refine(SQ8)``: nlist the power of two
  nearest ``4 sqrt(N)``, nprobe ``max(16, nlist/64)``, the PQ candidates
  re-ranked on 8-bit scalar-quantized vectors (k_factor 4); ``C/8 + C``
  bytes per vector, 3.3x less than flat.  Measured on 100k x 320-d
  (bench/retrieval_recall.py, 2 shared cores): recall@10 0.982 at 24-32x the
  exact queries/s (two runs), where HNSW32 (efSearch 128) gave 0.988 at 7x, 4x the
  memory and a longer build (86 s vs 61-75 s); PQ alone (no refine) 0.72.
  The IVF centroids and PQ codebooks are trained on the first shards
  (64 vectors per list); ``--add`` reuses them, so a corpus whose later shards
  differ a lot should be rebuilt (``--force``).  ``--factory HNSW32,Flat``
  avoids training altogether.

On-disk layout (``IDX/``)
-------------------------
``index.json`` (the commit point) names ``index.<gen>.faiss`` and
``keys.<gen>.parquet`` (columns ``key``, ``shard``, ``row``; faiss id = row
number).  A build or an ``--add`` writes a new generation under temporary
names, renames them, and only then replaces ``index.json``; a crash leaves
the previous index intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.errors import AsvrError, check_fingerprint
from asvr.core.shards import ShardError, ShardMeta, codes_array, list_shards, read_meta, read_shard, sha256_file

INDEX_JSON = "index.json"
INDEX_FORMAT = 1
RECIPE = "mean-decoded-l2"
EXACT_LIMIT = 100_000
DIGEST_SPAN = 1 << 20


class RetrievalError(AsvrError):
    """Bad index, shards or query: printed as one line by the CLI."""


# --------------------------------------------------------------------------- vectors
class ImageVectorizer:
    """codes ``[N, H, W, D]`` -> L2-normalised ``[N, C]`` float32 (the ``mean-decoded`` recipe)."""

    def __init__(self, codebooks: torch.Tensor, depth: int, batch: int = 512):
        cb = codebooks.detach().float().cpu()
        if cb.shape[0] == 1 and depth > 1:
            cb = cb.expand(depth, -1, -1)
        self.depth, self.k, self.dim = depth, cb.shape[1], cb.shape[2]
        self.table = cb[:depth].reshape(depth * self.k, self.dim).contiguous()
        self.offsets = torch.arange(depth, dtype=torch.long) * self.k
        self.batch = batch

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.shape[-1] != self.depth:
            raise RetrievalError(f"codes have depth {codes.shape[-1]}, the tokenizer has {self.depth}")
        n = codes.shape[0]
        flat = codes.reshape(n, -1, self.depth)
        out = np.empty((n, self.dim), np.float32)
        with torch.no_grad():
            for s in range(0, n, self.batch):
                c = torch.from_numpy(flat[s : s + self.batch].astype(np.int64)) + self.offsets
                # mean over H*W*D rows = (mean over patches of the decoded sum) / D; the scale goes in the norm
                v = torch.nn.functional.embedding_bag(c.reshape(c.shape[0], -1), self.table, mode="mean")
                out[s : s + len(v)] = torch.nn.functional.normalize(v, dim=1, eps=1e-12).numpy()
        return out


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


# --------------------------------------------------------------------------- build / add
@dataclass(frozen=True)
class BuildResult:
    meta: IndexMeta
    added_shards: list[str]
    skipped_shards: list[str]
    added_rows: int


def _shard_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows
    return read_shard(path)[1].num_rows


def _check_shard(path: Path, want: ShardMeta) -> None:
    m = read_meta(path)
    check_fingerprint(m.fingerprint, want.fingerprint, str(path), "the index's tokenizer")
    if m.preprocess != want.preprocess:
        raise RetrievalError(f"{path}: preprocess mode {m.preprocess!r}, the index holds {want.preprocess!r} codes")


def build_index(
    out: str | os.PathLike,
    idx_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    factory: str | None = None,
    search_params: dict[str, float] | None = None,
    add: bool = False,
    force: bool = False,
    progress: Callable[[int], object] | None = None,
) -> BuildResult:
    """Build ``idx_dir`` from the shards of ``out``, or with ``add`` extend it with the shards it lacks.

    ``progress(total_rows)`` returns a bar with ``update(n)`` and ``close()`` (a tqdm in the CLI)."""
    from asvr.tokenizer.artifact import load_artifact

    idx_dir = Path(idx_dir)
    shard_paths, old = _check_request(out, idx_dir, factory, add, force)
    tok_dir = Path(tokenizer) if tokenizer is not None else Path(old.tokenizer) if old else None
    if tok_dir is None:
        raise RetrievalError("--tokenizer is required to build an index")
    spec, codebooks = load_artifact(tok_dir)
    if old is not None:
        check_fingerprint(
            spec.fingerprint, old.fingerprint, f"tokenizer {tok_dir}", f"the index {idx_dir}", "build a new index"
        )
    preprocess = old.preprocess if old else read_meta(shard_paths[0]).preprocess
    new, skipped = _split_new_shards(shard_paths, ShardMeta.from_spec(spec, preprocess), old)
    if old is not None and not new:
        return BuildResult(old, [], skipped, 0)
    new_rows = sum(_shard_rows(p) for p, _ in new)
    if old is not None:
        meta = old
        index, keys = load_index_files(idx_dir, old)
    else:
        meta, index = _new_index(idx_dir, spec, str(tok_dir.resolve()), preprocess, factory, new_rows)
        keys = KEYS_SCHEMA.empty_table()
    if search_params:
        meta.search_params.update(search_params)
    bar = progress(new_rows) if progress else None
    new_keys = _add_shards(
        index, meta, set(keys.column("key").to_pylist()), new, ImageVectorizer(codebooks, spec.depth), new_rows, bar
    )
    if bar is not None:
        bar.close()  # type: ignore[attr-defined]
    apply_search_params(index, meta.search_params)
    save_index(idx_dir, meta, index, pa.concat_tables([keys, *new_keys]))
    return BuildResult(meta, [p.name for p, _ in new], skipped, new_rows)


def _check_request(
    out, idx_dir: Path, factory: str | None, add: bool, force: bool
) -> tuple[list[Path], IndexMeta | None]:
    """-> (the shards of ``out``, the index to extend or None); refuses a silent overwrite."""
    try:
        shard_paths = list_shards(out)
    except ShardError as e:
        raise RetrievalError(str(e)) from None
    existing = (idx_dir / INDEX_JSON).exists()
    if existing and not add and not force:
        raise RetrievalError(f"{idx_dir} already holds an index (use --add for new shards, --force to rebuild)")
    old = read_index_meta(idx_dir) if add and existing else None  # --add on a missing index is a fresh build
    if old is not None and factory and factory != old.factory:
        raise RetrievalError(f"{idx_dir} is a {old.factory!r} index; --factory {factory!r} needs a rebuild (--force)")
    return shard_paths, old


def _split_new_shards(
    shard_paths: list[Path], want: ShardMeta, old: IndexMeta | None
) -> tuple[list[tuple[Path, str]], list[str]]:
    """-> ((path, sha256) of the shards the index lacks, names of those it holds); checks every shard."""
    have = {(s.name, s.sha256) for s in old.shards} if old else set()
    new: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for p in shard_paths:
        _check_shard(p, want)
        digest = sha256_file(p)
        (skipped.append(p.name) if (p.name, digest) in have else new.append((p, digest)))
    return new, skipped


def _new_index(idx_dir: Path, spec, tokenizer: str, preprocess: str, factory: str | None, rows: int):
    """-> (meta, empty faiss index) of a fresh build; a rebuild (--force) continues the
    generation count, so no file the old index.json names is overwritten."""
    plan = IndexPlan(factory, {}) if factory else plan_index(rows, spec.dim)
    index = new_faiss_index(plan.factory, spec.dim)
    params = dict(default_search_params(index) if factory else plan.search_params)
    meta = IndexMeta(
        fingerprint=spec.fingerprint,
        tokenizer=tokenizer,
        preprocess=preprocess,
        grid=tuple(spec.grid),
        depth=spec.depth,
        codebook_size=spec.codebook_size,
        dim=spec.dim,
        factory=plan.factory,
        search_params=params,
    )
    if (idx_dir / INDEX_JSON).exists():
        try:
            meta.generation = read_index_meta(idx_dir).generation
        except RetrievalError:
            meta.generation = max(
                [int(p.name.split(".")[1]) for p in idx_dir.glob("index.*.faiss") if p.name.split(".")[1].isdigit()]
                + [0]
            )
    return meta, index


def _add_shards(
    index, meta: IndexMeta, seen: set[str], new: list[tuple[Path, str]], vectorize: ImageVectorizer, new_rows: int, bar
) -> list[pa.Table]:
    """Vectorise and add the rows of ``new`` (an untrained index is trained on the first
    ``train_size_for`` vectors first); records each shard in ``meta``.  -> their key tables."""
    pending: list[np.ndarray] = []  # vectors held back until an untrained index has its training sample
    want_train = train_size_for(index, new_rows)
    new_keys = []
    first_id = int(index.ntotal)
    for path, digest in new:
        smeta, table = read_shard(path)
        ks = table.column("key").to_pylist()
        dup = [k for k in ks if k in seen]
        if dup:
            raise RetrievalError(
                f"{path}: {len(dup)} keys already in the index (e.g. {dup[0]!r}); "
                "keys must be unique across the shards of one index"
            )
        seen.update(ks)
        meta.shards.append(ShardEntry(path.name, digest, str(path.resolve()), len(ks), first_id))
        new_keys.append(
            pa.table(
                {
                    "key": pa.array(ks, pa.string()),
                    "shard": pa.array(np.full(len(ks), len(meta.shards) - 1, np.int32)),
                    "row": pa.array(np.arange(len(ks), dtype=np.int64)),
                },
                schema=KEYS_SCHEMA,
            )
        )
        first_id += len(ks)
        pending.append(vectorize(codes_array(table, smeta)))
        if bar is not None:
            bar.update(len(ks))
        if not index.is_trained and sum(len(v) for v in pending) < want_train:
            continue
        if not index.is_trained:
            _train(index, np.concatenate(pending)[:want_train], meta.factory)
        for v in pending:
            index.add(v)
        pending = []
    if pending:  # fewer vectors than the training sample wanted: train on all of them
        sample = np.concatenate(pending)
        if not index.is_trained:
            _train(index, sample, meta.factory)
        index.add(sample)
    return new_keys


def _train(index, sample: np.ndarray, factory: str) -> None:
    try:
        index.train(sample)
    except RuntimeError as e:
        raise RetrievalError(
            f"cannot train {factory!r} on {len(sample)} vectors: "
            f"{str(e).splitlines()[-1][:160]} (use a smaller index or --factory Flat)"
        ) from None


# --------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Hit:
    key: str
    score: float
    id: int


class ImageIndex:
    """A built index: faiss index + keys + metadata."""

    def __init__(self, idx_dir: str | os.PathLike, search_params: dict[str, float] | None = None):
        self.dir = Path(idx_dir)
        self.meta = read_index_meta(self.dir)
        self.index, self.keys = load_index_files(self.dir, self.meta)
        self._key_list = self.keys.column("key").to_pylist()
        self._row_of: dict[str, int] | None = None
        apply_search_params(self.index, {**self.meta.search_params, **(search_params or {})})

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def id_of(self, key: str) -> int:
        if self._row_of is None:
            self._row_of = {k: i for i, k in enumerate(self._key_list)}
        if key not in self._row_of:
            raise RetrievalError(f"key {key!r} is not in the index {self.dir} ({len(self)} images)")
        return self._row_of[key]

    def key_of(self, i: int) -> str:
        return self._key_list[i]

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        scores, ids = self.index.search(vectors, min(k, len(self)))
        return [
            [Hit(self._key_list[i], float(s), int(i)) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    # ------------------------------------------------------------------ query vectors
    def vector_of_key(self, key: str, tokenizer: str | os.PathLike | None = None) -> np.ndarray:
        """The stored image's vector: exact reconstruction for flat storage, else recomputed from its shard."""
        import faiss

        i = self.id_of(key)
        if isinstance(faiss.downcast_index(self.index), (faiss.IndexFlat, faiss.IndexHNSWFlat)):
            # faiss's Python wrapper is typed as returning a torch Tensor; it is a numpy array here.
            return cast(np.ndarray, self.index.reconstruct(i))[None]
        shard = self.meta.shards[self.keys.column("shard")[i].as_py()]
        row = self.keys.column("row")[i].as_py()
        if not Path(shard.path).exists():
            raise RetrievalError(
                f"shard {shard.path} holding {key!r} has moved; the index needs it to rebuild the query"
            )
        smeta, table = read_shard(shard.path)
        return self.vectorizer(tokenizer)(codes_array(table.slice(row, 1), smeta))

    def vectorizer(self, tokenizer: str | os.PathLike | None = None) -> ImageVectorizer:
        from asvr.tokenizer.artifact import load_artifact

        spec, cb = load_artifact(tokenizer or self.meta.tokenizer)
        self.check_fingerprint(spec.fingerprint, tokenizer or self.meta.tokenizer)
        return ImageVectorizer(cb, spec.depth)

    def check_fingerprint(self, fingerprint: str, where) -> None:
        check_fingerprint(fingerprint, self.meta.fingerprint, f"tokenizer {where}", "the index")

    def vector_of_images(self, images: list, tokenizer) -> np.ndarray:
        """Encode image files with a loaded :class:`SemanticTokenizer` in the index's preprocess mode."""
        self.check_fingerprint(tokenizer.spec.fingerprint, tokenizer.path)
        codes = tokenizer.encode_images(images, mode=self.meta.preprocess)
        vec = ImageVectorizer(tokenizer.quantizer.codebooks, tokenizer.spec.depth)
        return vec(codes.cpu().numpy())
