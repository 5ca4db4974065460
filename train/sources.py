"""Data sources: the code shards (visual targets) and the LLaVA JSON conversations.

:class:`CodeStore` holds every shard row's codes as one uint16 array
``[N, H*W, D]`` plus a key -> row index.  At the reference scale
(27x27 grid, depth 8) a row is 11.7 KB, so LLaVA-665k's ~620k images are
7.2 GB per process: with ``cache_dir`` the array is written once as an
``.npy`` and memory-mapped by every rank (the page cache shares it), so N
ranks cost one copy.  Without it (tests, small corpora) it stays in RAM.

:class:`FeatureCache` is the ``features`` vision input: continuous encoder
features computed once from the images and memory-mapped afterwards (float32
[N, H, W, C]: 62 KB per image for EfficientNet-Lite0 7x7x320, but 3.4 MB for
SigLIP 27x27x1152, so 2.1 TB for LLaVA-665k: the ``codes`` input exists
because of that).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from asvr.pipeline.shards import ShardError, ShardMeta, codes_array, iter_shards, list_shards, read_meta


class DataError(ValueError):
    """Bad training data; the message is one line."""


@dataclass
class CodeStore:
    meta: ShardMeta
    keys: list[str]
    codes: np.ndarray  # uint16 [N, H*W, D] (maybe a read-only memmap)
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> np.ndarray:
        """uint16 ``[H*W, D]`` codes of one image."""
        return self.codes[self.index[key]]

    @classmethod
    def open(cls, codes_dir: str | os.PathLike, fingerprint: str, cache_dir: str | os.PathLike | None = None,
             write_cache: bool = True) -> "CodeStore":
        """Read all shards; refuse a foreign tokenizer fingerprint (one-line :class:`DataError`).

        ``cache_dir``: memory-map ``codes-<hash>.npy`` there (``write_cache``:
        this process builds it when missing; the others wait at a barrier and
        call again with ``write_cache=False``)."""
        try:
            files = list_shards(codes_dir)
            metas = [read_meta(f) for f in files]
        except (ShardError, OSError) as e:
            raise DataError(str(e)) from None
        for f, m in zip(files, metas):
            if m.fingerprint != fingerprint:
                raise DataError(f"{f}: written with tokenizer {m.fingerprint[:12]}, this run's tokenizer is "
                                f"{fingerprint[:12]}; re-tokenize the images with this tokenizer")
        if len({(m.grid, m.depth, m.preprocess) for m in metas}) != 1:
            raise DataError(f"{codes_dir}: shards disagree on grid/depth/preprocess mode")
        meta = metas[0]
        cache = None
        if cache_dir is not None:
            tag = hashlib.sha256(json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
                                 .encode()).hexdigest()[:16]
            cache = Path(cache_dir) / f"codes-{tag}"
            if (cache.with_suffix(".npy")).exists():
                keys = json.loads(cache.with_suffix(".keys.json").read_text())
                arr = np.load(cache.with_suffix(".npy"), mmap_mode="r")
                return cls(meta, keys, arr, {k: i for i, k in enumerate(keys)})
            if not write_cache:
                raise DataError(f"code cache {cache}.npy missing (rank 0 should have written it)")
        keys: list[str] = []
        parts = []
        for _, m, table in iter_shards(codes_dir, fingerprint):
            keys.extend(table.column("key").to_pylist())
            parts.append(codes_array(table, m).reshape(len(table), -1, m.depth))
        arr = np.concatenate(parts) if parts else np.zeros((0, meta.grid[0] * meta.grid[1], meta.depth), np.uint16)
        index: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in index:
                raise DataError(f"{codes_dir}: key {k!r} is in two shard rows")
            index[k] = i
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            _atomic_npy(cache.with_suffix(".npy"), arr)
            _atomic_text(cache.with_suffix(".keys.json"), json.dumps(keys))
        return cls(meta, keys, arr, index)


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class FeatureCache:
    """``features`` vision input: ``features-<fingerprint>-<mode>.npy`` float32 ``[N, H, W, C]``
    in the same row order as a :class:`CodeStore`, computed once from the images."""

    def __init__(self, path: Path, index: dict[str, int]):
        self.path = path
        self.index = index
        self.array = np.load(path, mmap_mode="r")

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.array[self.index[key]])

    @staticmethod
    def path_for(cache_dir: str | os.PathLike, store: CodeStore, keys: Sequence[str]) -> Path:
        """Named after the tokenizer, the preprocessing and the set of keys it holds
        (a run over other data never reads rows it did not compute)."""
        h = hashlib.sha256(json.dumps([store.keys, sorted(keys)]).encode()).hexdigest()[:12]
        return Path(cache_dir) / f"features-{store.meta.fingerprint[:12]}-{store.meta.preprocess}-{h}.npy"

    @classmethod
    def build(cls, cache_dir: str | os.PathLike, store: CodeStore, keys: Sequence[str],
              featurize: Callable[[list[str]], np.ndarray], batch_size: int = 32,
              progress: bool = True) -> "FeatureCache":
        """Compute features of ``keys`` (rows of other keys stay zero) unless the file exists.

        ``featurize(keys) -> float32 [n, H, W, C]`` (the frozen encoder on the preprocessed images)."""
        from tqdm import tqdm

        path = cls.path_for(cache_dir, store, keys)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            first = featurize(list(keys[:1])) if keys else np.zeros((1, *store.meta.grid, 1), np.float32)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(store), *first.shape[1:]))
            rows = sorted(store.index[k] for k in set(keys))
            for i in tqdm(range(0, len(rows), batch_size), desc="caching features", disable=not progress):
                chunk = rows[i:i + batch_size]
                arr[chunk] = featurize([store.keys[r] for r in chunk])
            arr.flush()
            del arr
            os.replace(tmp, path)
        return cls(path, store.index)


@dataclass
class ConversationRecord:
    sample_id: str
    image: str | None
    conversations: Any
    source: str


def load_conversations(paths: Sequence[str | os.PathLike]) -> list[ConversationRecord]:
    """LLaVA JSON files (a list of ``{id, image?, conversations}``) or JSON Lines."""
    out: list[ConversationRecord] = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text()
            data = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else json.loads(text)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read conversations ({e})") from None
        except RecursionError:
            raise DataError(f"{path}: cannot read conversations (JSON nested too deeply)") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of conversations")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                out.append(ConversationRecord(f"{path.name}[{i}]", None, None, str(path)))
                continue
            image = rec.get("image")
            out.append(ConversationRecord(str(rec.get("id", f"{path.name}[{i}]")),
                                          image if isinstance(image, str) else None if image is None else repr(image),
                                          rec.get("conversations"), str(path)))
    return out
