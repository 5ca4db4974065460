"""Training data: conversations joined to code shards, tokenized, checked, packed, collated.

``build_training_data`` reads everything once (a few seconds per 100k
conversations), so every problem is found before the first step: keys absent
from every shard, missing image files (online/features inputs), malformed
conversations and samples whose image does not fit in ``max_len`` are
counted and listed, and refused unless ``skip_bad_samples``.  Shard rows that
no conversation references are the caption-free pool (visual loss only).

:class:`Collator` turns a micro-batch plan (rows of sample indices, see
``packing.py``) into a :class:`~asvr.train.data.batch.Batch`; :class:`PackedLoader`
iterates plans epoch after epoch and carries ``(epoch, position)`` so a run
resumes mid-epoch on exactly the next micro-batch.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from asvr.core.atomic import atomic_write
from asvr.core.paths import UnsafePathError, confine, regular_file_error

from asvr.train.data.batch import Batch
from asvr.train.data.packing import MicroBatch, PackingConfig, plan_epoch, shard_for_rank
from asvr.train.data.sources import CodeStore, ConversationRecord, DataError, load_conversations
from asvr.train.data.templates import (
    IGNORE_INDEX,
    ConversationError,
    ConversationTemplate,
    EncodedSample,
    encode_conversation,
    encode_image_only,
    validate_turns,
)


@dataclass(kw_only=True)
class DataConfig:
    data: list[str]
    """LLaVA JSON (or .jsonl) conversation files."""
    codes: str
    """Code shard directory (Contract 2) written with this run's tokenizer."""
    images: str | None = None
    """Image root (LLaVA ``image`` paths are relative to it); needed by online/features inputs."""
    vision_input: str = "codes"
    """online | features | codes (``asvr.train.model.vision_input``): decides which images must exist."""
    image_tokens: int | None = None
    """LLM positions per image (default: the shards' grid H*W; a cls_patch tower adds one)."""
    caption_free_ratio: float = 0.0
    """Share of caption-free shard rows in the mix: n_free = r/(1-r) * n_conversations (r >= 1: all)."""
    skip_bad_samples: bool = False
    """Skip (and list) bad samples instead of refusing the data."""
    seed: int = 0
    packing: PackingConfig = field(default_factory=PackingConfig)
    num_workers: int = 0
    """DataLoader worker processes (0: collate in the training process)."""

    def __post_init__(self):
        from asvr.train.model.vision_input import get_vision_input

        get_vision_input(self.vision_input).check_images(self.images)
        if self.caption_free_ratio < 0:
            raise ValueError("caption_free_ratio must be >= 0")


@dataclass
class Sample:
    sample_id: str
    key: str | None  # shard key of its image (None: text only)
    encoded: EncodedSample


@dataclass
class BadSample:
    sample_id: str
    source: str
    kind: str  # malformed | not in shards | missing image | unsafe image path | too long
    reason: str


@dataclass
class TrainingData:
    samples: list[Sample]
    store: CodeStore
    bad: list[BadSample]
    n_conversations: int
    n_caption_free: int
    no_placeholder: list[str] = field(default_factory=list)
    """Ids of image samples whose conversation has no ``<image>``: trained as text only (LLaVA's rule)."""

    @property
    def lengths(self) -> list[int]:
        return [len(s.encoded) for s in self.samples]

    def keys_with_images(self) -> list[str]:
        return sorted({s.key for s in self.samples if s.key is not None})


def describe_bad(bad: Sequence[BadSample], first: int = 3) -> str:
    kinds = Counter(b.kind for b in bad)
    head = "; ".join(f"{b.sample_id} ({b.reason})" for b in bad[:first])
    return f"{len(bad)} bad samples ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}): {head}"


def image_problem(root: Path, key: str) -> tuple[str, str] | None:
    """``(kind, reason)`` when ``--images/key`` cannot be an image input (it escapes the root, is
    missing or is not a regular file), else None.  Keys come from shards and conversations, i.e. from
    data: the same confinement as the pipeline's LLaVA input (:func:`asvr.core.paths.confine`)."""
    try:
        path = confine(root, key)
    except UnsafePathError as e:
        return "unsafe image path", f"{key!r}: {str(e).replace('the image root', '--images')}"
    why = regular_file_error(path)
    if why is None:
        return None
    return "missing image", f"{root / key} {'does not exist' if not os.path.lexists(path) else why}"


def build_training_data(
    cfg: DataConfig,
    template: ConversationTemplate,
    llm_tokenizer,
    store: CodeStore,
    check_images: bool | Callable[[str], bool],
    records: Sequence[ConversationRecord] | None = None,
) -> TrainingData:
    """Join, validate and tokenize. Raises :class:`DataError` on bad samples unless ``cfg.skip_bad_samples``.

    ``check_images``: whether ``images/key`` must exist, for every key or per key (a
    vision input's ``needs_image``: a features cache that holds a key needs no image).
    ``records``: these conversations instead of reading ``cfg.data`` (one unit of ``asvr-pipeline pack``)."""
    meta = store.meta
    image_tokens = cfg.image_tokens or meta.grid[0] * meta.grid[1]
    need = check_images if callable(check_images) else (lambda key: check_images)
    max_len = cfg.packing.max_len
    records = load_conversations(cfg.data) if records is None else records
    samples: list[Sample] = []
    bad: list[BadSample] = []
    referenced: set[str] = set()
    root = Path(cfg.images) if cfg.images else None
    no_placeholder: list[str] = []
    missing_keys: list[str] = []

    def problem(key: str) -> tuple[str, str] | None:
        """``image_problem`` for a key whose image this run needs, else None."""
        if not need(key):
            return None
        if root is None:  # the vision input's check_images refuses such runs before this
            raise DataError(f"image {key!r} is needed but no --images folder was given")
        return image_problem(root, key)

    for rec in records:
        if rec.image is not None:
            referenced.add(rec.image)

        def refuse(kind: str, reason: str, rec: ConversationRecord = rec) -> None:
            bad.append(BadSample(rec.sample_id, rec.source, kind, reason))

        if rec.image_error is not None:
            refuse("malformed", rec.image_error)
            continue
        try:
            turns = validate_turns(rec.conversations, rec.image is not None)
            enc = encode_conversation(template, turns, llm_tokenizer, image_tokens)
        except ConversationError as e:
            refuse("malformed", str(e))
            continue
        if rec.image is not None and rec.image not in store:
            refuse("not in shards", f"image {rec.image!r} is in no shard")
            continue
        if rec.image is not None and (why := problem(rec.image)):
            refuse(*why)
            missing_keys.extend([rec.image] if why[0] == "missing image" else [])
            continue
        if len(enc) > max_len:
            if enc.image_mask[max_len:].any():
                refuse("too long", f"{len(enc)} tokens and the image ends past max_len {max_len}")
                continue
            enc = enc.truncated(max_len)
        # an image sample without <image> trains as text only (LLaVA drops its image): counted
        if rec.image is not None and not enc.image_mask.any():
            no_placeholder.append(rec.sample_id)
        samples.append(Sample(rec.sample_id, rec.image if enc.image_mask.any() else None, enc))
    n_conv = len(samples)
    free_pool = [k for k in store.keys if k not in referenced]
    r = cfg.caption_free_ratio
    n_free = len(free_pool) if r >= 1 else min(len(free_pool), int(round(r / (1 - r) * n_conv)))
    if n_free:
        missing = {k: why for k in free_pool if (why := problem(k))}
        if missing:
            bad.extend(BadSample(k, "shards", *missing[k]) for k in free_pool if k in missing)
            missing_keys.extend(k for k in free_pool if k in missing and missing[k][0] == "missing image")
            free_pool = [k for k in free_pool if k not in missing]
            n_free = min(n_free, len(free_pool))
        rng = np.random.default_rng([cfg.seed, 7])
        chosen = sorted(rng.choice(len(free_pool), size=n_free, replace=False).tolist())
        enc = encode_image_only(template, llm_tokenizer, image_tokens)
        if len(enc) > max_len:
            raise DataError(f"an image takes {len(enc)} positions > --max-len {max_len}")
        samples.extend(Sample(f"caption-free:{free_pool[i]}", free_pool[i], enc) for i in chosen)
    if root is not None and missing_keys and not any(s.key is not None for s in samples):
        raise DataError(images_root_hint(root, missing_keys))  # --skip-bad-samples would train on no image
    if bad and not cfg.skip_bad_samples:
        raise DataError(describe_bad(bad) + "; fix them or pass --skip-bad-samples")
    if not samples:
        raise DataError("no training samples left")
    return TrainingData(samples, store, bad, n_conv, n_free, no_placeholder)


def describe_no_placeholder(ids: Sequence[str], first: int = 3) -> str:
    """``2 image samples have no <image> in their conversation and train as text only (a, b)``."""
    return (
        f"{len(ids)} image sample{'s' if len(ids) != 1 else ''} with no <image> in the conversation, trained as "
        f"text only as LLaVA does ({', '.join(ids[:first])}{', ...' if len(ids) > first else ''})"
    )


def images_root_hint(root: Path, missing: Sequence[str]) -> str:
    """Every image is missing: the root is off, not the samples; say where the first key is, if near
    (the parent of --images or one of its subfolders, the two usual slips)."""
    key = missing[0]
    near = [root.parent] + (sorted(d for d in root.iterdir() if d.is_dir())[:50] if root.is_dir() else [])
    found = next((d for d in near if (d / key).is_file()), None)
    where = f"; {key} is under {found}: --images {found}?" if found is not None else ""
    return (
        f"none of the {len(missing)} images is under --images {root} (like {root / key}): "
        f"check --images, the folder the 'image' paths are relative to{where}"
    )


def open_codes(
    codes: str | os.PathLike, vision, cache_dir: str | os.PathLike | None = None, write_cache: bool = True
) -> CodeStore:
    """The shards of ``codes``, refused unless written with the tokenizer ``vision``
    describes (fingerprint, grid, depth: a ``VisionSpec`` or a ``TokenizerSpec``)."""
    store = CodeStore.open(codes, vision.fingerprint, cache_dir=cache_dir, write_cache=write_cache)
    if tuple(store.meta.grid) != tuple(vision.grid) or store.meta.depth != vision.depth:
        raise DataError(
            f"{codes}: shards have grid {store.meta.grid} x depth {store.meta.depth}, "
            f"the tokenizer {tuple(vision.grid)} x {vision.depth}"
        )
    return store


def assemble_data(
    cfg: DataConfig,
    template: ConversationTemplate,
    llm_tokenizer,
    store: CodeStore,
    *,
    tower=None,
    cache_dir: str | os.PathLike | None = None,
    primary: bool = True,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
    grey_codes: np.ndarray | None = None,
) -> tuple[TrainingData, "Collator"]:
    """The one data path of the trainer and ``asvr-eval loss``: samples joined and
    checked, and the collator whose vision input is ``cfg.vision_input``'s.

    ``tower``: the ``VisionTower`` of the online/features inputs; ``cache_dir``:
    where the features input keeps its cache (None: computed on demand);
    ``primary``/``barrier``: one process fills caches while the others wait;
    ``grey_codes``: --text-only-visual-loss grey-image targets."""
    from asvr.train.model.vision_input import SourceContext, get_vision_input

    mode = get_vision_input(cfg.vision_input)
    cache = mode.open_cache(Path(cache_dir), store, tower) if cache_dir is not None else None
    data = build_training_data(cfg, template, llm_tokenizer, store, lambda key: mode.needs_image(key, cache))
    barrier()  # every process has judged the samples against the same cache before one fills it
    source = mode.source(
        SourceContext(
            store=store,
            images=cfg.images,
            tower=tower,
            preprocess=store.meta.preprocess,
            cache=cache,
            keys=data.keys_with_images(),
            primary=primary,
            barrier=barrier,
            progress=progress,
        )
    )
    return data, Collator(data, source, pad_id=llm_tokenizer.pad_token_id or 0, grey_codes=grey_codes)


class Collator:
    """Micro-batch plan -> :class:`Batch` (picklable: runs in DataLoader workers).

    ``source(key)`` is what the vision input yields for one image
    (``VisionInputMode.source``: codes, pixels or features); the visual targets
    always come from the shards."""

    def __init__(
        self, data: TrainingData, source: Callable[[str], np.ndarray], pad_id: int, grey_codes: np.ndarray | None = None
    ):
        self.samples = data.samples
        self.store = data.store
        self.source = source
        self.pad_id = pad_id
        self.grey_codes = grey_codes  # [H*W, D]: --text-only-visual-loss grey-image

    def __call__(self, mb: MicroBatch) -> Batch:
        width = max(sum(len(self.samples[i].encoded) for i in row) for row in mb)
        b = len(mb)
        ids = np.full((b, width), self.pad_id, np.int64)
        labels = np.full((b, width), IGNORE_INDEX, np.int64)
        pos = np.zeros((b, width), np.int64)
        sid = np.zeros((b, width), np.int64)
        img = np.zeros((b, width), bool)
        keys: list[str] = []
        n_text_only = 0
        for r, row in enumerate(mb):
            t = 0
            for n, i in enumerate(row, start=1):
                s = self.samples[i]
                e = s.encoded
                L = len(e)
                ids[r, t : t + L] = e.input_ids
                labels[r, t : t + L] = e.labels
                pos[r, t : t + L] = np.arange(L)
                sid[r, t : t + L] = n
                img[r, t : t + L] = e.image_mask
                if s.key is not None:  # set exactly when the sample has image positions
                    keys.append(s.key)
                else:
                    n_text_only += 1
                t += L
        vision = codes = vmask = None
        if keys:
            vision = torch.from_numpy(np.stack([self.source(k) for k in keys]))
            codes = torch.from_numpy(np.stack([self.store.get(k) for k in keys]).astype(np.int64))
            vmask = torch.ones(len(keys), dtype=torch.bool)
        grey = None
        if self.grey_codes is not None and n_text_only:
            grey = torch.from_numpy(np.repeat(self.grey_codes[None].astype(np.int64), n_text_only, axis=0))
        return Batch(
            input_ids=torch.from_numpy(ids),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(pos),
            sample_ids=torch.from_numpy(sid),
            image_mask=torch.from_numpy(img),
            vision=vision,
            visual_codes=codes,
            visual_loss_mask=vmask,
            text_only_codes=grey,
        )


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, plan: list[MicroBatch], collate: Collator):
        self.plan = plan
        self.collate = collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        return self.collate(self.plan[i])


class PackedLoader:
    """Endless, deterministic, rank-sharded micro-batches with resumable ``(epoch, position)``."""

    def __init__(
        self,
        lengths: Sequence[int],
        collate: Collator,
        packing: PackingConfig,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ):
        self.lengths = list(lengths)
        self.collate = collate
        self.packing = packing
        self.seed = seed
        self.rank = rank
        self.world = world
        self.num_workers = num_workers
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already handed out on this rank
        if not self.rank_plan(0):
            raise DataError(f"{len(self.lengths)} samples make fewer micro-batches than the {world} ranks")

    def rank_plan(self, epoch: int) -> list[MicroBatch]:
        return shard_for_rank(plan_epoch(self.lengths, self.packing, self.seed, epoch), self.rank, self.world)

    def micro_batches_per_epoch(self) -> int:
        return len(self.rank_plan(0))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world", self.world) != self.world or state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"checkpoint loader state was for seed {state.get('seed')} x {state.get('world')} ranks; "
                f"this run has seed {self.seed} x {self.world} ranks"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            rest = self.rank_plan(self.epoch)[self.position :]
            if self.num_workers > 0:
                it: Iterable[Batch] = torch.utils.data.DataLoader(
                    _PlanDataset(rest, self.collate),
                    batch_size=None,
                    shuffle=False,
                    num_workers=self.num_workers,
                    persistent_workers=False,
                )
            else:
                it = (self.collate(mb) for mb in rest)
            for batch in it:
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0


def write_bad_samples(path: str | os.PathLike, bad: Sequence[BadSample]) -> None:
    import json

    atomic_write(path, "".join(json.dumps(b.__dict__) + "\n" for b in bad))
