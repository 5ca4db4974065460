"""Training data: conversations joined to code shards, tokenized, checked, packed, collated.

``build_training_data`` reads everything once (a few seconds per 100k
conversations), so every problem is found before the first step: keys absent
from every shard, missing image files (online/features inputs), malformed
conversations and samples whose image does not fit in ``max_len`` are
counted and listed, and refused unless ``skip_bad_samples``.  Shard rows that
no conversation references are the caption-free pool (visual loss only).

:class:`Collator` and :class:`PackedLoader` (micro-batches, resumable) live in
:mod:`asvr.train.data.loader` and are importable from here.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from asvr.core.atomic import atomic_write
from asvr.core.paths import UnsafePathError, confine, regular_file_error

from asvr.train.data.loader import Collator, PackedLoader  # noqa: F401 - PackedLoader importable from here
from asvr.train.data.packing import PackingConfig
from asvr.train.data.sources import CodeStore, ConversationRecord, DataError, load_conversations
from asvr.train.data.templates import (
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


class _Join:
    """The samples of one :func:`build_training_data` call, with what it refused on the way."""

    def __init__(self, cfg: DataConfig, template, llm_tokenizer, store: CodeStore, need: Callable[[str], bool]):
        self.template, self.llm_tokenizer, self.store, self.need = template, llm_tokenizer, store, need
        self.image_tokens = cfg.image_tokens or store.meta.grid[0] * store.meta.grid[1]
        self.max_len = cfg.packing.max_len
        self.root = Path(cfg.images) if cfg.images else None
        self.samples: list[Sample] = []
        self.bad: list[BadSample] = []
        self.referenced: set[str] = set()
        self.no_placeholder: list[str] = []
        self.missing_keys: list[str] = []

    def problem(self, key: str) -> tuple[str, str] | None:
        """``image_problem`` for a key whose image this run needs, else None."""
        if not self.need(key):
            return None
        if self.root is None:  # the vision input's check_images refuses such runs before this
            raise DataError(f"image {key!r} is needed but no --images folder was given")
        return image_problem(self.root, key)

    def _encode(self, rec: ConversationRecord) -> EncodedSample | tuple[str, str]:
        """The record's tokens, or ``(kind, reason)`` why it is refused."""
        if rec.image_error is not None:
            return "malformed", rec.image_error
        try:
            turns = validate_turns(rec.conversations, rec.image is not None)
            enc = encode_conversation(self.template, turns, self.llm_tokenizer, self.image_tokens)
        except ConversationError as e:
            return "malformed", str(e)
        if rec.image is not None and rec.image not in self.store:
            return "not in shards", f"image {rec.image!r} is in no shard"
        if rec.image is not None and (why := self.problem(rec.image)):
            self.missing_keys.extend([rec.image] if why[0] == "missing image" else [])
            return why
        if len(enc) > self.max_len:
            if enc.image_mask[self.max_len :].any():
                return "too long", f"{len(enc)} tokens and the image ends past max_len {self.max_len}"
            enc = enc.truncated(self.max_len)
        return enc

    def add(self, rec: ConversationRecord) -> None:
        if rec.image is not None:
            self.referenced.add(rec.image)
        enc = self._encode(rec)
        if isinstance(enc, tuple):
            self.bad.append(BadSample(rec.sample_id, rec.source, *enc))
            return
        # an image sample without <image> trains as text only (LLaVA drops its image): counted
        if rec.image is not None and not enc.image_mask.any():
            self.no_placeholder.append(rec.sample_id)
        self.samples.append(Sample(rec.sample_id, rec.image if enc.image_mask.any() else None, enc))

    def add_caption_free(self, ratio: float, seed: int) -> int:
        """Shard rows no conversation references, as image-only samples (``ratio`` of the
        samples) -> how many."""
        free_pool = [k for k in self.store.keys if k not in self.referenced]
        n_conv = len(self.samples)
        n_free = len(free_pool) if ratio >= 1 else min(len(free_pool), int(round(ratio / (1 - ratio) * n_conv)))
        if not n_free:
            return 0
        missing = {k: why for k in free_pool if (why := self.problem(k))}
        if missing:
            self.bad.extend(BadSample(k, "shards", *missing[k]) for k in free_pool if k in missing)
            self.missing_keys.extend(k for k in free_pool if k in missing and missing[k][0] == "missing image")
            free_pool = [k for k in free_pool if k not in missing]
            n_free = min(n_free, len(free_pool))
        rng = np.random.default_rng([seed, 7])
        chosen = sorted(rng.choice(len(free_pool), size=n_free, replace=False).tolist())
        enc = encode_image_only(self.template, self.llm_tokenizer, self.image_tokens)
        if len(enc) > self.max_len:
            raise DataError(f"an image takes {len(enc)} positions > --max-len {self.max_len}")
        self.samples.extend(Sample(f"caption-free:{free_pool[i]}", free_pool[i], enc) for i in chosen)
        return n_free


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
    need = check_images if callable(check_images) else (lambda key: check_images)
    join = _Join(cfg, template, llm_tokenizer, store, need)
    for rec in load_conversations(cfg.data) if records is None else records:
        join.add(rec)
    n_conv = len(join.samples)
    n_free = join.add_caption_free(cfg.caption_free_ratio, cfg.seed)
    samples, bad = join.samples, join.bad
    if join.root is not None and join.missing_keys and not any(s.key is not None for s in samples):
        raise DataError(images_root_hint(join.root, join.missing_keys))  # --skip-bad-samples would train on no image
    if bad and not cfg.skip_bad_samples:
        raise DataError(describe_bad(bad) + "; fix them or pass --skip-bad-samples")
    if not samples:
        raise DataError("no training samples left")
    return TrainingData(samples, store, bad, n_conv, n_free, join.no_placeholder)


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
) -> tuple[TrainingData, Collator]:
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


def write_bad_samples(path: str | os.PathLike, bad: Sequence[BadSample]) -> None:
    import json

    atomic_write(path, "".join(json.dumps(b.__dict__) + "\n" for b in bad))


def grey_image_codes(tokenizer, image_size: int) -> np.ndarray:
    """Codes ``[H*W, D]`` of LLaVA's dummy image for text-only samples: ``torch.zeros(3, S, S)`` after
    normalisation (the mean colour: mid-grey for SigLIP's 0.5 mean)."""
    codes = tokenizer.encode_pixels(np.zeros((1, 3, image_size, image_size), np.float32))
    return codes.reshape(-1, codes.shape[-1]).cpu().numpy()
