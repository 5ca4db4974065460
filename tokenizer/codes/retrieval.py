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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from asvr.core.errors import check_fingerprint
from asvr.core.shards import ShardError, ShardMeta, codes_array, list_shards, read_meta, read_shard, sha256_file

from asvr.tokenizer.codes.faiss_index import (  # noqa: F401 - the index API stays importable from here
    DIGEST_SPAN,
    EXACT_LIMIT,
    INDEX_FORMAT,
    INDEX_JSON,
    KEYS_SCHEMA,
    RECIPE,
    IndexMeta,
    IndexPlan,
    RetrievalError,
    ShardEntry,
    apply_search_params,
    default_search_params,
    file_digest,
    load_index_files,
    new_faiss_index,
    parse_search_params,
    plan_index,
    read_index_meta,
    save_index,
    train_size_for,
)


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
