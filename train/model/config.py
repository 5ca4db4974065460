"""The LVLM's configuration: ``ModelConfig`` and its components (the visual head, the
tokenizer's ``VisionSpec``, the LLM's own ``VisionTowerSpec``), and ``tiny_llm_config``.

The model package's own contract: the exported model folder stores a ``ModelConfig`` in
``asvr_config.json`` (``to_dict`` / ``from_dict``), and :mod:`asvr.train.model` builds from it
alone.  A training run's options (``TrainConfig``, :mod:`asvr.train.config`) configure this
one object through ``TrainConfig.model_config``; :mod:`asvr.train.config` re-exports these names,
so ``from asvr.train.config import ModelConfig`` keeps working.  Split from ``train/config.py``
(476 lines) along that seam: the model, which an export reloads, and the run, which only the
trainer reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from asvr.train.model.vision_input import get_vision_input

TOWER_SELECT = ("patch", "cls_patch")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(kw_only=True)
class VisualHeadConfig:
    """The ASVR visual head (see ``visual_head.py``).  Defaults are the reference's."""

    proj_hidden: int = 2048
    """Hidden width of the projector from the LLM state (hidden -> proj_hidden -> width, GELU)."""
    width: int = 2048
    """Width of the depth transformer."""
    layers: int = 3
    """Depth-transformer layers."""
    head_dim: int = 128
    """Attention head size; heads = width // head_dim (the reference: embed_dim // 128)."""
    ffn_mult: int = 2
    """Depth-specific FFN hidden size = ffn_mult * width (the reference: 2)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""

    def __post_init__(self):
        if self.width % self.head_dim:
            raise ValueError(f"visual head width {self.width} is not a multiple of head_dim {self.head_dim}")
        if min(self.proj_hidden, self.width, self.layers, self.head_dim, self.ffn_mult) < 1:
            raise ValueError("visual head sizes must be positive")


@dataclass(kw_only=True)
class VisionSpec:
    """What the LVLM needs to know about the frozen semantic tokenizer."""

    dim: int
    """Feature / codebook vector size C."""
    grid: tuple[int, int]
    """Feature grid [H, W]; an image takes H*W positions."""
    depth: int
    """Residual depth D."""
    codebook_size: int
    """Codes per depth K."""
    fingerprint: str = ""
    """Tokenizer fingerprint (Contract 1); checked when the model is reloaded."""
    path: str | None = None
    """Where the tokenizer artifact was loaded from (used by ``load_exported``)."""

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        if len(self.grid) != 2 or min(self.grid) < 1 or min(self.dim, self.depth, self.codebook_size) < 1:
            raise ValueError(
                f"bad vision spec: grid {self.grid}, dim {self.dim}, depth {self.depth}, K {self.codebook_size}"
            )

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]


def image_tokens(grid: tuple[int, int] | list[int], select: str = "patch") -> int:
    """LLM positions per image: the patch grid, plus the CLS token for cls_patch."""
    return int(grid[0]) * int(grid[1]) + (select == "cls_patch")


@dataclass(kw_only=True)
class VisionTowerSpec:
    """The LLM's own vision tower (``--vision-tower``), when it is not the target
    tokenizer's encoder.  Recorded in the export so evaluation rebuilds it."""

    encoder: dict[str, Any]
    """``EncoderSpec`` fields (kind, absolute weights path, feature layer, image size,
    normalisation, resample, weights sha256)."""
    select: str = "patch"
    """patch: the patch tokens; cls_patch: CLIP's CLS token first, then the patches
    (LLaVA's ``mm_vision_select_feature``)."""
    source: str = ""
    """The folder given to --vision-tower (a Hugging Face vision folder or a tokenizer artifact)."""
    grid: tuple[int, int] = (1, 1)
    """Patch grid [H, W]; must equal the tokenizer's (the targets sit on it)."""
    dim: int = 1
    """Feature size: the projector's input width."""
    fingerprint: str = ""
    """sha256 over the encoder spec (weights hash included) and ``select``: names feature caches."""

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        if self.select not in TOWER_SELECT:
            raise ValueError(f"vision tower select must be one of {TOWER_SELECT}, got {self.select!r}")

    @property
    def tokens_per_image(self) -> int:
        """LLM positions per image: the patches, plus the CLS token for cls_patch."""
        return image_tokens(self.grid, self.select)


@dataclass(kw_only=True)
class ModelConfig:
    """The LVLM: a Hugging Face causal LM + vision projector + ASVR visual head."""

    llm: str | dict[str, Any]
    """A local Hugging Face model folder (weights loaded), a config.json path, or a
    config dict with ``model_type`` (random init: tests, benchmarks)."""
    trust_remote_code: bool = False
    """Allow model code shipped in the folder. Off unless asked."""
    vision_input: str = "codes"
    """online: frozen vision tower on pixels; features: cached continuous features;
    codes: features rebuilt from the cached codes (sum of codebook vectors).
    The modes are ``asvr.train.model.vision_input.VISION_INPUTS``."""
    projector: str = "mlp2x_gelu"
    """Vision projector: linear or mlpNx_gelu (the reference: mlp2x_gelu)."""
    head: VisualHeadConfig = field(default_factory=VisualHeadConfig)
    visual_loss_weight: float = 1.0
    """lambda in loss = text CE + lambda * mean over depths of the visual CE (reference: 1)."""
    visual_loss_chunk: int = 2048
    """Rows per chunk of the visual classifier+CE; peak extra memory is chunk x K floats."""
    attn_implementation: str = "auto"
    """auto: flash_attention_2 when flash_attn imports and CUDA is up, else sdpa."""
    dtype: str = "float32"
    """Parameter dtype: float32 (CPU), bfloat16 (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute LLM layers and head layers in backward."""
    vision: VisionSpec | None = None
    """Filled by ``build_model`` from the tokenizer (or given with codebooks)."""
    vision_tower: VisionTowerSpec | None = None
    """The LLM's vision tower when it is not the tokenizer's encoder (online/features only)."""

    def __post_init__(self):
        if isinstance(self.head, dict):
            self.head = VisualHeadConfig(**self.head)
        if isinstance(self.vision, dict):
            self.vision = VisionSpec(**self.vision)
        if isinstance(self.vision_tower, dict):
            self.vision_tower = VisionTowerSpec(**self.vision_tower)
        get_vision_input(self.vision_input).check_tower(self.vision_tower is not None)
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.visual_loss_weight < 0 or self.visual_loss_chunk < 1:
            raise ValueError("visual_loss_weight must be >= 0 and visual_loss_chunk >= 1")
        if not isinstance(self.llm, (str, dict)):
            raise ValueError("llm must be a folder / config.json path or a config dict")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_dim(self) -> int:
        """Width of the features the projector receives (the tower's, else the codebooks')."""
        if self.vision_tower is not None:
            return self.vision_tower.dim
        if self.vision is None:
            raise ValueError("ModelConfig.vision is not set (build_model fills it from the tokenizer)")
        return self.vision.dim

    @property
    def image_tokens(self) -> int:
        """LLM positions per image (the tower's tokens, else the tokenizer grid)."""
        if self.vision_tower is not None:
            return self.vision_tower.tokens_per_image
        if self.vision is None:
            raise ValueError("ModelConfig.vision is not set (build_model fills it from the tokenizer)")
        return self.vision.tokens_per_image

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.vision is not None:
            d["vision"]["grid"] = list(self.vision.grid)
        if self.vision_tower is not None:
            d["vision_tower"]["grid"] = list(self.vision_tower.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def tiny_llm_config(
    family: str = "llama",
    *,
    vocab_size: int = 300,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
) -> dict:
    """A tiny decoder config dict of a real family (llama, qwen2, mistral): tests,
    ``make demo`` and CPU smoke runs build random LLMs from it."""
    if family not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"tiny configs exist for llama, qwen2, mistral; not {family!r}")
    cfg = dict(
        model_type=family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=family == "qwen2",
    )
    if family == "mistral":
        cfg["sliding_window"] = None
    return cfg
