"""The vision *input* of the LVLM: one strategy object per mode.

Each mode owns both halves of what it means:

* its **data half**: which images must exist, where its cache lives, and what
  the loader yields per image key (:meth:`VisionInputMode.source`, a
  picklable ``key -> array`` that DataLoader workers call), plus what a
  benchmark image becomes (:meth:`VisionInputMode.from_images`);
* its **model half**: how that array reaches the projector
  (:meth:`VisionInputMode.to_features`, called by :class:`VisionInput`).

The modes:

* ``online``: the frozen vision tower on preprocessed pixels ``[N, 3, S, S]``
  every step (the paper's setting; costs a tower forward per step).
* ``features``: the tower's features ``[N, T, C]``, computed once into
  ``RUN/cache/features-<tower>-<preprocess>-<shards>.npy`` (named by the
  tower's fingerprint, so switching towers never reads a stale cache) and
  memory-mapped; evaluation computes them on demand.
* ``codes``: features rebuilt from the cached codes ``[N, H, W, D]`` as the
  sum of their codebook vectors; no tower, no images.  A separate
  ``--vision-tower`` is an error here.

The tower (``vision_tower.py``) is the tokenizer's encoder unless
``--vision-tower`` names another.  Everything is frozen: no gradient reaches
the tower or the codebooks.  The codebooks live in :class:`VisionInput` (a
non-persistent buffer, never exported: they belong to the tokenizer
artifact) and also feed the visual head's teacher forcing.

Adding a mode is one subclass here plus its entry in ``VISION_INPUTS``; no
other module branches on the mode's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from asvr.core.paths import UnsafePathError, confine, read_regular
from asvr.tokenizer.preprocess import ImageError, PreprocessConfig, open_image, preprocess
from asvr.tokenizer.rvq.quantizer import ResidualQuantizer

if TYPE_CHECKING:  # config.py imports this module (its one list of modes); sources needs pyarrow
    from asvr.train.model.config import VisionSpec
    from asvr.train.data.sources import CodeStore, FeatureCache
    from asvr.train.model.vision_tower import VisionTower


def _data_error(msg: str) -> Exception:
    from asvr.train.data.sources import DataError

    return DataError(msg)


# --------------------------------------------------------------------------- per-key sources (data half)
class CodesSource:
    """key -> int64 codes ``[H, W, D]`` from the shards."""

    def __init__(self, store: CodeStore):
        self.store = store

    def __call__(self, key: str) -> np.ndarray:
        h, w = self.store.meta.grid
        return self.store.get(key).astype(np.int64).reshape(h, w, -1)


class PixelSource:
    """key -> preprocessed pixels ``[3, S, S]`` of ``images/key`` (the tower's preprocessing)."""

    def __init__(self, images: str | Path, cfg: PreprocessConfig):
        self.images = Path(images)
        self.cfg = cfg

    def __call__(self, key: str) -> np.ndarray:
        path = self.images / key
        try:  # keys are data: confined to the image root as the pipeline's LLaVA input
            data = read_regular(confine(self.images, key))
            return preprocess(open_image(data, self.cfg), self.cfg)
        except (UnsafePathError, ImageError) as e:
            raise _data_error(f"{path}: {e}") from None


class TowerFeatures:
    """key -> the tower's features ``[T, C]``, computed on demand (held-out evaluation)."""

    def __init__(self, tower, images: str | Path, preprocess_mode: str):
        self.tower = tower
        self.images = Path(images)
        self.mode = preprocess_mode

    def batch(self, keys: Sequence[str]) -> np.ndarray:
        try:
            pixels = self.tower.preprocess_images([read_regular(confine(self.images, k)) for k in keys], self.mode)
        except (OSError, ValueError) as e:  # UnsafePathError and ImageError are ValueErrors
            raise _data_error(f"computing features: {e}") from None
        return self.tower.features(pixels).cpu().numpy()

    def __call__(self, key: str) -> np.ndarray:
        return self.batch([key])[0]


@dataclass
class SourceContext:
    """What a mode may need to make its per-key source."""

    store: CodeStore
    images: str | None = None
    tower: VisionTower | None = None
    """The LLM's vision tower (online/features)."""
    preprocess: str = "square"
    """square | pad: the shards' preprocessing mode."""
    cache: FeatureCache | None = None
    """features: the run's cache (None: compute on demand)."""
    keys: Sequence[str] = ()
    """Image keys the run uses (the cache is filled for these)."""
    primary: bool = True
    """This process fills caches (rank 0); the others wait at ``barrier``."""
    barrier: Callable[[], None] = lambda: None
    progress: bool = True


# --------------------------------------------------------------------------- the modes
class VisionInputMode:
    """One vision input: its data half and its model half (see module doc)."""

    name: ClassVar[str]
    uses_tower: ClassVar[bool] = False
    """The LLM's input comes from a vision tower (and needs the images, at least once)."""
    model_runs_tower: ClassVar[bool] = False
    """The model itself runs the tower every step."""

    def check_tower(self, tower_given: bool) -> None:
        if tower_given and not self.uses_tower:
            raise ValueError(
                f"--vision-tower feeds the online and features inputs; the {self.name} input rebuilds "
                f"the features from the codes"
            )

    def check_images(self, images: str | None) -> None:
        if self.uses_tower and not images:
            raise ValueError(f"vision input {self.name!r} needs --images (the image root)")

    # ------------------------------------------------------------------ data half
    def open_cache(self, cache_dir: Path, store: CodeStore, tower) -> FeatureCache | None:
        """Where this mode's cache lives (None: it has none)."""
        return None

    def needs_image(self, key: str, cache: FeatureCache | None) -> bool:
        """Must ``images/key`` exist for this run?"""
        return self.uses_tower

    def source(self, ctx: SourceContext) -> Callable[[str], np.ndarray]:
        raise NotImplementedError

    def from_images(self, paths: Sequence, *, tower, tokenizer, preprocess: str) -> torch.Tensor:
        """Benchmark images -> this mode's model input for a batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ model half
    def to_features(self, module: "VisionInput", vision: torch.Tensor) -> torch.Tensor:
        """This mode's input -> features ``[N, T, C]``."""
        raise NotImplementedError


class OnlineInput(VisionInputMode):
    name = "online"
    uses_tower = True
    model_runs_tower = True

    def source(self, ctx: SourceContext):
        if ctx.tower is None or ctx.images is None:
            raise ValueError("the online input needs the vision tower and the image root")
        return PixelSource(ctx.images, ctx.tower.preprocess_config(ctx.preprocess))

    def from_images(self, paths, *, tower, tokenizer, preprocess):
        return torch.from_numpy(tower.preprocess_images(paths, preprocess))

    def to_features(self, module, vision):
        if vision.ndim != 4 or vision.shape[1] != 3:
            raise ValueError(f"online vision input must be pixels [N, 3, S, S], got {tuple(vision.shape)}")
        return module.encoder(vision)


class FeaturesInput(VisionInputMode):
    name = "features"
    uses_tower = True

    def open_cache(self, cache_dir, store, tower):
        from asvr.train.data.sources import FeatureCache

        return FeatureCache.open(cache_dir, store, tower.spec.fingerprint)

    def needs_image(self, key, cache):
        return cache is None or key not in cache

    def source(self, ctx: SourceContext):
        if ctx.tower is None:
            raise ValueError("the features input needs the vision tower")
        compute = TowerFeatures(ctx.tower, ctx.images or ".", ctx.preprocess)
        if ctx.cache is None:
            return compute
        if ctx.primary:
            ctx.cache.fill(ctx.keys, compute.batch, progress=ctx.progress)
        ctx.barrier()
        ctx.cache.reload()
        missing = [k for k in ctx.keys if k not in ctx.cache]
        if missing:
            raise _data_error(f"feature cache {ctx.cache.path} lacks {len(missing)} keys (e.g. {missing[0]!r})")
        return ctx.cache.get

    def from_images(self, paths, *, tower, tokenizer, preprocess):
        return tower.features(tower.preprocess_images(paths, preprocess))

    def to_features(self, module, vision):
        return vision.reshape(vision.shape[0], -1, vision.shape[-1]).float()


class CodesInput(VisionInputMode):
    name = "codes"

    def source(self, ctx: SourceContext):
        return CodesSource(ctx.store)

    def from_images(self, paths, *, tower, tokenizer, preprocess):
        return tokenizer.encode_pixels(tokenizer.preprocess_images(paths, mode=preprocess))

    def to_features(self, module, vision):
        d = module.spec.depth
        if vision.dtype.is_floating_point or vision.shape[-1] != d:
            raise ValueError(
                f"codes vision input must be integer [N, H, W, {d}], got {vision.dtype} {tuple(vision.shape)}"
            )
        feats = module.quantizer.decode(vision)
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])


VISION_INPUTS: dict[str, VisionInputMode] = {m.name: m for m in (OnlineInput(), FeaturesInput(), CodesInput())}
"""The one list of vision inputs (CLI choices, config validation)."""


def get_vision_input(name: str) -> VisionInputMode:
    try:
        return VISION_INPUTS[name]
    except KeyError:
        raise ValueError(f"vision input must be one of {tuple(VISION_INPUTS)}, got {name!r}") from None


# --------------------------------------------------------------------------- the model half's module
class VisionInput(nn.Module):
    """The model's ``vision`` submodule: the mode's input -> features ``[N, T, C]``;
    holds the frozen codebooks and, for modes that run it, the tower."""

    def __init__(
        self,
        mode: str,
        spec: VisionSpec,
        codebooks: torch.Tensor,
        tower: nn.Module | None = None,
        *,
        tokens: int | None = None,
        dim: int | None = None,
    ):
        super().__init__()
        self.kind = get_vision_input(mode)
        if self.kind.model_runs_tower and tower is None:
            raise ValueError(f"vision_input {mode!r} needs a vision tower (pass a SemanticTokenizer or a tower)")
        want = (spec.codebook_size, spec.dim)
        if codebooks.ndim != 3 or tuple(codebooks.shape[1:]) != want or codebooks.shape[0] not in (1, spec.depth):
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)} do not fit depth {spec.depth}, K x C {want}")
        self.mode = mode
        self.spec = spec
        self.tokens = tokens or spec.tokens_per_image
        self.dim = dim or spec.dim
        self.quantizer = ResidualQuantizer(codebooks, depth=spec.depth)
        self.encoder = tower if self.kind.model_runs_tower else None
        if self.encoder is not None:
            self.encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "VisionInput":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: batch-norm statistics and dropout stay in eval mode
        return self

    @torch.no_grad()
    def forward(self, vision: torch.Tensor | None) -> torch.Tensor:
        """The mode's input (see module doc) or None -> features ``[N, T, C]`` (N may be 0)."""
        if vision is None:
            return self.quantizer.codebooks.new_zeros(0, self.tokens, self.dim)
        feats = self.kind.to_features(self, vision)
        if tuple(feats.shape[1:]) != (self.tokens, self.dim):
            raise ValueError(
                f"vision features have shape {tuple(feats.shape)}, the model takes [N, {self.tokens}, {self.dim}]"
            )
        return feats

    def code_context(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input of the visual head: codes ``[N, D]`` -> cumulative
        codebook sums of the first D-1 depths ``[N, D-1, C]``."""
        if codes.shape[1] <= 1:
            return self.quantizer.codebooks.new_zeros(codes.shape[0], 0, self.spec.dim)
        return self.quantizer.cumulative(codes[:, :-1])
