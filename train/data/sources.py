"""Data sources: the code shards (visual targets) and the LLaVA JSON conversations.

:class:`CodeStore` holds every shard row's codes as one uint16 array
``[N, H*W, D]`` plus a key -> row index.  At the reference scale
(27x27 grid, depth 8) a row is 11.7 KB, so LLaVA-665k's ~620k images are
7.2 GB per process: with ``cache_dir`` the array is written once as an
``.npy`` and memory-mapped by every rank (the page cache shares it), so N
ranks cost one copy.  Without it (tests, small corpora) it stays in RAM.

:class:`FeatureCache` is the ``features`` vision input: continuous encoder
features computed once from the images and memory-mapped afterwards (float32
[N, T, C]: 62 KB per image for EfficientNet-Lite0 7x7x320, but 3.4 MB for
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

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.errors import AsvrError, check_fingerprint
from asvr.core.llava_json import LlavaJSONError, read_llava_records
from asvr.core.shards import ShardError, ShardMeta, codes_array, iter_shards, list_shards, read_meta


class DataError(AsvrError):
    """Bad training data; the message is one line."""


def _shard_metas(codes_dir, fingerprint: str) -> tuple[list[Path], ShardMeta]:
    """The shard files of ``codes_dir`` and their one meta; a foreign fingerprint or shards that
    disagree are a one-line :class:`DataError`."""
    try:
        files = list_shards(codes_dir)
        metas = [read_meta(f) for f in files]
    except (ShardError, OSError) as e:
        raise DataError(str(e)) from None
    for f, m in zip(files, metas):
        check_fingerprint(
            m.fingerprint,
            fingerprint,
            str(f),
            "this run's tokenizer",
            "tokenize the images again with this tokenizer",
        )
    if len({(m.grid, m.depth, m.preprocess) for m in metas}) != 1:
        raise DataError(f"{codes_dir}: shards disagree on grid/depth/preprocess mode")
    return files, metas[0]


def _cache_stem(cache_dir, files: list[Path]) -> Path:
    """``cache_dir/codes-<hash>``: the hash of the shards' paths, sizes and mtimes."""
    tag = hashlib.sha256(
        json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / f"codes-{tag}"


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
    def open(
        cls,
        codes_dir: str | os.PathLike,
        fingerprint: str,
        cache_dir: str | os.PathLike | None = None,
        write_cache: bool = True,
    ) -> "CodeStore":
        """Read all shards; refuse a foreign tokenizer fingerprint (one-line :class:`DataError`).

        ``cache_dir``: memory-map ``codes-<hash>.npy`` there (``write_cache``:
        this process builds it when missing; the others wait at a barrier and
        call again with ``write_cache=False``)."""
        files, meta = _shard_metas(codes_dir, fingerprint)
        cache = None
        if cache_dir is not None:
            cache = _cache_stem(cache_dir, files)
            if (cache.with_suffix(".npy")).exists():
                cached = json.loads(cache.with_suffix(".keys.json").read_text())
                arr = np.load(cache.with_suffix(".npy"), mmap_mode="r")
                return cls(meta, cached, arr, {k: i for i, k in enumerate(cached)})
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
            with atomic_path(cache.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
            atomic_write(cache.with_suffix(".keys.json"), json.dumps(keys))
        return cls(meta, keys, arr, index)


class FeatureCache:
    """``features`` vision input: ``features-<tower>-<preprocess>-<shards>.npy``, float32
    ``[N, T, C]`` in the row order of a :class:`CodeStore`, computed once from the images
    and memory-mapped; ``<stem>.keys.json`` lists the rows computed so far (written after
    the array, so a crash between the two only recomputes rows).  The name holds the vision
    tower's fingerprint, the preprocessing mode and the shards' key list, so another tower,
    mode or corpus never reads these rows; a later run over more keys adds only the missing
    rows."""

    def __init__(self, path: Path, store: CodeStore):
        self.path = path
        self.index = store.index
        self.n_rows = len(store)
        self.done: set[str] = set()
        self.array: np.ndarray | None = None
        self.reload()

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, store: CodeStore, tower_fingerprint: str) -> "FeatureCache":
        tag = hashlib.sha256(json.dumps(store.keys).encode()).hexdigest()[:12]
        return cls(Path(cache_dir) / f"features-{tower_fingerprint[:12]}-{store.meta.preprocess}-{tag}.npy", store)

    @property
    def keys_path(self) -> Path:
        return self.path.with_suffix(".keys.json")

    def reload(self) -> None:
        self.done = set(json.loads(self.keys_path.read_text())) if self.keys_path.exists() else set()
        self.array = np.load(self.path, mmap_mode="r") if self.path.exists() else None

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def get(self, key: str) -> np.ndarray:
        if self.array is None:
            raise DataError(f"{self.path}: the features cache holds no rows yet")
        return np.asarray(self.array[self.index[key]])

    def fill(
        self,
        keys: Sequence[str],
        featurize: Callable[[list[str]], np.ndarray],
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        """Compute the rows of ``keys`` not cached yet; ``featurize(keys) -> float32 [n, T, C]``."""
        from tqdm import tqdm

        missing = sorted({k for k in keys if k not in self.done}, key=self.index.__getitem__)
        if not missing:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        first = featurize(missing[:1])
        with atomic_path(self.path) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.n_rows, *first.shape[1:]))
            if self.array is not None and self.array.shape == arr.shape:
                for s in range(0, self.n_rows, 1024):
                    arr[s : s + 1024] = self.array[s : s + 1024]
            else:
                self.done = set()
            arr[self.index[missing[0]]] = first[0]
            rest = missing[1:]
            for i in tqdm(range(0, len(rest), batch_size), desc="caching features", disable=not progress):
                chunk = rest[i : i + batch_size]
                arr[[self.index[k] for k in chunk]] = featurize(chunk)
            arr.flush()
            del arr
        atomic_write(self.keys_path, json.dumps(sorted(self.done | set(missing))))
        self.reload()


@dataclass
class ConversationRecord:
    sample_id: str
    image: str | None
    conversations: Any
    source: str
    image_error: str | None = None
    """Why ``image`` cannot be used as it stands (a list of images), else None."""


def load_conversations(paths: Sequence[str | os.PathLike]) -> list[ConversationRecord]:
    """LLaVA JSON files (a list of ``{id, image?, conversations}``) or JSON Lines."""
    out: list[ConversationRecord] = []
    for path in paths:
        path = Path(path)
        try:
            data = read_llava_records(path)
        except LlavaJSONError as e:
            raise DataError(str(e)) from None
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                out.append(ConversationRecord(f"{path.name}[{i}]", None, None, str(path)))
                continue
            image = rec.get("image")
            error = None
            if isinstance(image, list):
                error = f"image lists are not supported (one image per sample): {image!r:.120}"
            elif image is not None and not isinstance(image, str):
                error = f"'image' must be a string (a path under --images), not {type(image).__name__}"
            out.append(
                ConversationRecord(
                    str(rec.get("id", f"{path.name}[{i}]")),
                    image if isinstance(image, str) else None if image is None else repr(image),
                    rec.get("conversations"),
                    str(path),
                    error,
                )
            )
    return out
