"""The vision tower a Hugging Face LLaVA export holds: the SigLIP / CLIP model that fed the
LLM, with the preprocessing it was trained under, or the one-line reason there is none.  Split
from ``hf_llava.py`` in issue 21 (files under 400 lines).
"""

from __future__ import annotations

from asvr.core.errors import AsvrError

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from asvr.tokenizer.encoders.base import encoder_kind
from asvr.tokenizer.preprocess import preprocess_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HFExportError(AsvrError):
    """Why a model cannot become a Hugging Face LLaVA (one line)."""


@dataclass(frozen=True)
class HFTower:
    """The Hugging Face vision tower that fed the LLM, as the export needs it."""

    kind: str
    """``siglip`` or ``clip``."""
    model: PreTrainedModel
    """The truncated ``SiglipVisionModel`` / ``CLIPVisionModel`` (frozen)."""
    tower: torch.nn.Module
    """The ``VisionTower`` it belongs to (passed to ``load_exported``: built once)."""
    image_size: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str
    preprocess: str
    """``square`` or ``pad`` (the shards' mode: the tower sees the image region the targets cover)."""
    keep_cls: bool = False
    """``--vision-tower-select cls_patch`` (CLIP): the CLS token is an LLM position too."""

    @property
    def strategy(self) -> Literal["default", "full"]:
        """LLaVA's ``vision_feature_select_strategy``: ``default`` drops the first (CLS) token."""
        return "default" if encoder_kind(self.kind).drop_cls and not self.keep_cls else "full"


def hf_tower(cfg, tokenizer) -> HFTower:
    """The LLM's Hugging Face tower (``--vision-tower`` as recorded, else the tokenizer's
    encoder), or a one-line refusal that says why there is none."""
    from asvr.train.model.vision_input import get_vision_input
    from asvr.train.model.vision_tower import VisionTower, load_vision_tower

    if not get_vision_input(cfg.vision_input).uses_tower:
        raise HFExportError(
            f"this model reads its image features rebuilt from cached semantic codes "
            f"(--vision-input {cfg.vision_input}), which a LLaVA cannot compute from pixels; train "
            f"with --vision-input online or features to export it"
        )
    tower = (
        load_vision_tower(cfg.vision_tower) if cfg.vision_tower is not None else VisionTower.from_tokenizer(tokenizer)
    )
    enc, e = tower.encoder, tower.encoder_spec
    if not encoder_kind(e.kind).llava_export:
        raise HFExportError(
            f"the LLM's vision tower is {e.kind}, not a Hugging Face SigLIP/CLIP tower, so "
            f"transformers' LLaVA cannot hold it; train with a SigLIP or CLIP tower "
            f"(--vision-tower) to export"
        )
    if preprocess_mode(tokenizer.spec.preprocess).llava_do_pad is None:
        raise HFExportError(f"no LLaVA image processor does preprocess mode {tokenizer.spec.preprocess!r}")
    return HFTower(
        kind=enc.kind,
        model=enc.model,
        tower=tower,
        image_size=e.image_size,
        patch_size=enc.model.config.patch_size,
        mean=tuple(e.mean),
        std=tuple(e.std),
        resample=e.resample,
        preprocess=tokenizer.spec.preprocess,
        keep_cls=tower.select == "cls_patch",
    )
