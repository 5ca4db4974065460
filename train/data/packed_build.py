"""Packed rows from the trainer's own data path: one unit of ``asvr-pipeline pack``.

A unit is a slice of the conversations plus the caption-free keys assigned to it.  It goes
through exactly what ``asvr-train`` does at start-up (:func:`~asvr.train.data.dataset.build_training_data`:
join by key, validate, render the template, tokenize, labels, truncation, the same bad-sample
reasons) and then through the same packer (:func:`~asvr.train.data.packing.plan_epoch`, best-fit
decreasing in windows, one row per micro-batch), with ``epoch = unit``.  So a corpus packed as
one unit has exactly the rows of the in-memory path's epoch 0 with ``--micro-batch-size 1``
(tested); with several units, best-fit runs inside each unit (windows never span units, so
packing waste is that of the in-memory path as long as units hold >= one window).

No torch here except what :mod:`dataset` imports; the pipeline's ``pack`` job calls
:func:`pack_unit` in its Ray tasks (the one import from pipeline into train, declared in
pyproject.toml).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from asvr.core.packed import PackedMeta, rows_to_table
from asvr.core.shards import ShardMeta

from asvr.train.data.dataset import DataConfig, Sample, build_training_data
from asvr.train.data.packing import PackingConfig, plan_epoch
from asvr.train.data.sources import CodeStore, ConversationRecord, DataError
from asvr.train.data.templates import get_template


def text_tokenizer_hash(llm_tokenizer) -> str:
    """sha256 of what decides the token ids: the fast tokenizer's full JSON (vocabulary, merges,
    normaliser, added tokens) when there is one, else the vocabulary and special tokens."""
    backend = getattr(llm_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(
            [sorted(llm_tokenizer.get_vocab().items()), sorted(map(str, llm_tokenizer.all_special_tokens))]
        )
    return hashlib.sha256(f"{type(llm_tokenizer).__name__}\n{text}".encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class PackSettings:
    """What a packed corpus is made with (recorded in every shard and in the manifest)."""

    template: str
    max_len: int = 2048
    image_tokens: int | None = None
    """LLM positions per image (default: the shards' grid H*W)."""
    window: int = 1024
    seed: int = 0


@dataclass
class UnitRows:
    table: pa.Table | None  # packed rows (None: no rows)
    failures: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def packed_meta(meta: ShardMeta, settings: PackSettings, text_hash: str) -> PackedMeta:
    return PackedMeta.from_shards(
        meta,
        text_tokenizer=text_hash,
        template=settings.template,
        max_len=settings.max_len,
        image_tokens=settings.image_tokens or meta.grid[0] * meta.grid[1],
    )


def row_columns(samples: Sequence[Sample], rows: Sequence[Sequence[int]], store: CodeStore) -> dict[str, list]:
    """Packed rows (lists of sample indices) -> the columns of :mod:`asvr.core.packed`."""
    out: dict[str, list] = {
        k: [] for k in ("input_ids", "labels", "sample_ids", "sample_offsets", "image_keys", "image_offsets", "codes")
    }
    for row in rows:
        encs = [samples[i].encoded for i in row]
        offsets = np.cumsum([0] + [len(e) for e in encs])
        keys, img_off = [], []
        for i, e, off in zip(row, encs, offsets):
            s = samples[i]
            if s.key is not None:
                keys.append(s.key)
                img_off.append(int(off + np.flatnonzero(e.image_mask)[0]))
        out["input_ids"].append(np.concatenate([e.input_ids for e in encs]))
        out["labels"].append(np.concatenate([e.labels for e in encs]))
        out["sample_ids"].append([samples[i].sample_id for i in row])
        out["sample_offsets"].append(offsets)
        out["image_keys"].append(keys)
        out["image_offsets"].append(img_off)
        out["codes"].append(
            np.concatenate([store.get(k).reshape(-1) for k in keys]) if keys else np.zeros(0, np.uint16)
        )
    return out


def plan_rows(lengths: Sequence[int], settings: PackSettings, epoch: int) -> list[list[int]]:
    """The in-memory packer's rows (one row per micro-batch), in its order."""
    cfg = PackingConfig(max_len=settings.max_len, rows=1, pack=True, window=settings.window)
    return [mb[0] for mb in plan_epoch(lengths, cfg, settings.seed, epoch)]


def pack_unit(
    unit: int,
    records: Sequence[ConversationRecord],
    free_keys: Sequence[str],
    store: CodeStore,
    llm_tokenizer,
    settings: PackSettings,
    text_hash: str,
) -> UnitRows:
    """One unit's packed rows and failure rows (``key, source, stage, error``: the trainer's reasons).
    ``store`` holds (at least) the rows of the unit's image keys and ``free_keys``, in the shards' order."""
    image_tokens = settings.image_tokens or store.meta.grid[0] * store.meta.grid[1]
    cfg = DataConfig(
        data=[],
        codes="",
        image_tokens=image_tokens,
        caption_free_ratio=1.0 if free_keys else 0.0,
        skip_bad_samples=True,
        seed=settings.seed,
        packing=PackingConfig(max_len=settings.max_len, window=settings.window),
    )
    referenced = {r.image for r in records if r.image is not None}
    unit_store = _restrict(store, [k for k in store.keys if k in referenced or k in set(free_keys)])
    try:
        data = build_training_data(
            cfg, get_template(settings.template), llm_tokenizer, unit_store, False, records=records
        )
    except DataError as e:
        if "no training samples left" not in str(e):
            raise
        return UnitRows(None, [], {"samples": 0, "rows": 0})
    failures = [{"key": b.sample_id, "source": b.source, "stage": b.kind, "error": b.reason} for b in data.bad]
    rows = plan_rows(data.lengths, settings, unit)
    meta = packed_meta(store.meta, settings, text_hash)
    table = rows_to_table(meta, row_columns(data.samples, rows, unit_store))
    tokens = int(sum(data.lengths))
    counts = {
        "samples": len(data.samples),
        "conversations": data.n_conversations,
        "caption_free": data.n_caption_free,
        "failed": len(failures),
        "no_placeholder": len(data.no_placeholder),
        "rows": len(rows),
        "tokens": tokens,
    }
    return UnitRows(table, failures, counts)


def _restrict(store: CodeStore, keys: list[str]) -> CodeStore:
    idx = [store.index[k] for k in keys]
    codes = store.codes[idx] if idx else store.codes[:0]
    return CodeStore(store.meta, keys, codes, {k: i for i, k in enumerate(keys)})


def caption_free_keys(
    store_keys: Sequence[str], referenced: set[str], ratio: float, n_conv: int, seed: int
) -> list[str]:
    """The caption-free keys the in-memory path draws (same rng, same count rule), in shard order.
    ``n_conv``: the conversations that became samples (the in-memory path's count)."""
    pool = [k for k in store_keys if k not in referenced]
    n = len(pool) if ratio >= 1 else min(len(pool), int(round(ratio / (1 - ratio) * n_conv)))
    if not n:
        return []
    rng = np.random.default_rng([seed, 7])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False).tolist())]


def read_conversations(paths: Sequence[str]) -> list[ConversationRecord]:
    """The trainer's reader of LLaVA JSON / JSON Lines (one-line :class:`DataError`)."""
    from asvr.train.data.sources import load_conversations

    return load_conversations(paths)


def store_from_shards(meta: ShardMeta, locations: dict[str, tuple[str, int]]) -> CodeStore:
    """A :class:`CodeStore` of just these keys (``key -> (shard file, row)``), read shard by shard
    (each shard once, codes range-checked by :func:`asvr.core.shards.read_shard`), in shard order."""
    from asvr.core.shards import codes_array, read_shard

    by_file: dict[str, list[tuple[int, str]]] = {}
    for key, (f, row) in locations.items():
        by_file.setdefault(f, []).append((row, key))
    keys: list[str] = []
    parts = []
    for f in sorted(by_file):
        wanted = sorted(by_file[f])
        m, table = read_shard(f)
        arr = codes_array(table.take([r for r, _ in wanted]), m)
        parts.append(arr.reshape(len(wanted), -1, m.depth))
        keys.extend(k for _, k in wanted)
    hw = meta.grid[0] * meta.grid[1]
    codes = np.concatenate(parts) if parts else np.zeros((0, hw, meta.depth), np.uint16)
    return CodeStore(meta, keys, codes, {k: i for i, k in enumerate(keys)})
