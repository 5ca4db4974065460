"""The LLM's vision tower: the frozen encoder whose features the projector sees.

By default it is the target tokenizer's own encoder (the features of the
patches whose codes are the visual targets).  The paper feeds the LLM from a
separate tower (``google/siglip-so400m-patch14-384``, layer -2) while the
targets come from DualToken's SigLIP + codebooks; ``--vision-tower DIR``
names that tower, independent of the tokenizer:

* a Hugging Face SigLIP or CLIP vision folder (``config.json`` with
  ``model_type`` siglip/clip, full or vision-only, plus safetensors/bin
  weights; ``preprocessor_config.json`` gives the normalisation), loaded with
  strict keys through ``asvr.tokenizer.encoders.base``; ``--vision-tower-layer``
  picks the hidden state (default -2, LLaVA's ``mm_vision_select_layer``);
* a tokenizer artifact: its encoder (and recorded layer unless
  ``--vision-tower-layer`` says otherwise), weights checked against the
  sha256 the artifact recorded.

``--vision-tower-select`` is LLaVA's ``mm_vision_select_feature``: ``patch``
(the patch tokens; CLIP's CLS token dropped) or ``cls_patch`` (CLIP only: the
CLS token first, then the patches: ``H*W + 1`` LLM positions per image).

Grids: each LLM image position carries the visual target of the same patch,
so the tower's patch grid must equal the tokenizer's (the paper uses 27x27
for both: so400m/14 at 384 px).  A different grid is refused, not resampled:
interpolating features onto the target grid would train the head to
reconstruct codes of patches the LLM never saw as such, which is no longer
the paper's objective.  With ``cls_patch`` the CLS position gets no visual
target.  The image preprocessing (size, normalisation, resample) is the
tower's own; the square/pad mode is the shards', so both views cover the
same image region.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from asvr.tokenizer.artifact import TOKENIZER_JSON, load_artifact
from asvr.core.errors import AsvrError, check_fingerprint
from asvr.tokenizer.encoders.base import (
    EncoderLoadError,
    EncoderSpec,
    build_encoder,
    default_encoder_spec,
    encoder_kind,
    encoder_kinds,
    hash_encoder_weights,
    kind_of_model_type,
)
from asvr.tokenizer.preprocess import PreprocessConfig, open_image, preprocess

from asvr.train.model.config import TOWER_SELECT, VisionTowerSpec


class VisionTowerError(AsvrError):
    """A bad --vision-tower; the message is one line."""


def tower_fingerprint(encoder: EncoderSpec, select: str) -> str:
    """Identity of the features: everything that changes them, not where the weights lie."""
    d = {k: v for k, v in encoder.to_dict().items() if k != "weights"}
    return hashlib.sha256(json.dumps({**d, "select": select}, sort_keys=True).encode()).hexdigest()


class VisionTower(nn.Module):
    """Frozen encoder + its preprocessing + token selection: pixels ``[N, 3, S, S]`` -> tokens ``[N, T, C]``."""

    def __init__(self, encoder: Any, encoder_spec: EncoderSpec, select: str = "patch", source: str = ""):
        super().__init__()
        if select not in TOWER_SELECT:
            raise VisionTowerError(f"--vision-tower-select must be one of {TOWER_SELECT}, got {select!r}")
        if select == "cls_patch" and not encoder_kind(encoder_spec.kind).drop_cls:
            raise VisionTowerError(
                f"--vision-tower-select cls_patch needs a CLIP tower (a CLS token); {encoder_spec.kind} has none"
            )
        self.encoder: Any = encoder.eval().requires_grad_(False)
        self.encoder_spec = encoder_spec
        self.select = select
        self.spec = VisionTowerSpec(
            encoder=encoder_spec.to_dict(),
            select=select,
            source=source,
            grid=tuple(encoder.grid),
            dim=int(encoder.dim),
            fingerprint=tower_fingerprint(encoder_spec, select),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "VisionTower":
        """The default tower: the tokenizer's own encoder (shared, not copied)."""
        enc = EncoderSpec(**tokenizer.spec.encoder.to_dict())
        return cls(tokenizer.encoder, enc, "patch", str(tokenizer.path or ""))

    def train(self, mode: bool = True) -> "VisionTower":
        super().train(mode)
        self.encoder.eval()  # frozen: batch-norm statistics and dropout stay in eval mode
        return self

    @property
    def tokens_per_image(self) -> int:
        return self.spec.tokens_per_image

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.encoder.parameters(), None)
        x = pixels.to(p.dtype if p is not None else torch.float32)
        if self.select == "cls_patch":
            return self.encoder.model(pixel_values=x, output_hidden_states=True).hidden_states[self.encoder.layer]
        f = self.encoder(x)
        return f.reshape(f.shape[0], -1, f.shape[-1])

    # ------------------------------------------------------------------ images
    def preprocess_config(self, mode: str) -> PreprocessConfig:
        return PreprocessConfig.for_encoder(self.encoder_spec, mode)

    def preprocess_images(self, images: Sequence[str | os.PathLike | bytes], mode: str) -> np.ndarray:
        cfg = self.preprocess_config(mode)
        out = []
        for im in images:
            data = im if isinstance(im, (bytes, bytearray)) else Path(im).read_bytes()
            out.append(preprocess(open_image(bytes(data), cfg), cfg))
        return np.stack(out)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocessed pixels -> float32 tokens ``[N, T, C]``."""
        dev = next((p.device for p in self.encoder.parameters()), torch.device("cpu"))
        return self.forward(torch.as_tensor(pixels).to(dev)).float()


def _hf_kind(folder: Path) -> str:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VisionTowerError(f"--vision-tower {folder}: cannot read config.json ({e})") from None
    kind = kind_of_model_type(str(raw.get("model_type", "")))
    if kind is None:
        known = sorted(t for k in encoder_kinds().values() for t in k.hf_model_types)
        raise VisionTowerError(
            f"--vision-tower {folder}: model_type {raw.get('model_type')!r} is not a SigLIP or "
            f"CLIP vision model ({known})"
        )
    return kind.name


def build_tower(encoder: EncoderSpec, select: str, source: str) -> VisionTower:
    """Strict: the weights must hash to ``encoder.weights_sha256``."""
    try:
        got = hash_encoder_weights(encoder)
        if encoder.weights_sha256 and got != encoder.weights_sha256:
            raise VisionTowerError(
                f"vision tower weights at {encoder.weights} are not the recorded ones "
                f"(sha256 {got[:12]} != {encoder.weights_sha256[:12]})"
            )
        encoder.weights_sha256 = got
        return VisionTower(build_encoder(encoder), encoder, select, source)
    except (EncoderLoadError, OSError) as e:
        raise VisionTowerError(f"vision tower {source or encoder.weights}: {e}") from None


def open_vision_tower(path: str | os.PathLike, *, layer: int | None = None, select: str = "patch") -> VisionTower:
    """``--vision-tower DIR``: a Hugging Face SigLIP/CLIP vision folder or a tokenizer artifact."""
    p = Path(path)
    if (p / TOKENIZER_JSON).is_file():
        tspec, _ = load_artifact(p)
        enc = EncoderSpec(**tspec.encoder.to_dict())
        if not enc.weights.startswith("package:") and not Path(enc.weights).is_absolute():
            enc.weights = str((p / enc.weights).resolve())
        if layer is not None:
            enc.feature_layer = layer  # same weight files (and sha256), another layer
    elif (p / "config.json").is_file():
        kind = _hf_kind(p)  # its own one-line message (outside the try: not prefixed twice)
        try:
            enc = default_encoder_spec(kind, str(p), layer)
        except (EncoderLoadError, TypeError, ValueError) as e:
            raise VisionTowerError(f"--vision-tower {p}: {e}") from None
    else:
        raise VisionTowerError(
            f"--vision-tower {p}: neither a tokenizer artifact ({TOKENIZER_JSON}) nor a Hugging "
            f"Face vision folder (config.json)"
        )
    return build_tower(enc, select, str(p.resolve()))


def load_vision_tower(spec: VisionTowerSpec) -> VisionTower:
    """Rebuild a recorded tower (export folders); its fingerprint must not change."""
    tower = build_tower(EncoderSpec(**spec.encoder), spec.select, spec.source)
    check_fingerprint(tower.spec.fingerprint, spec.fingerprint, f"vision tower {spec.source}", "the recorded one")
    return tower


def check_tower_grid(tower: VisionTowerSpec, grid: Sequence[int]) -> None:
    if tuple(tower.grid) != tuple(grid):
        raise VisionTowerError(
            f"the vision tower {tower.source} gives a {tower.grid[0]}x{tower.grid[1]} patch grid, the tokenizer's "
            f"targets lie on {grid[0]}x{grid[1]}: each image position carries the target of its own patch, so the "
            f"grids must be equal (pick the tower's image size / patch size, or the tokenizer, to match)"
        )
