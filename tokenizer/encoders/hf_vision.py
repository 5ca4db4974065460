"""``siglip`` / ``clip``: a Hugging Face vision tower from a local folder.

``feature_layer`` indexes ``hidden_states`` (default -2, the second to last as
the reference: layer 26 of so400m's 27).  Layers above it are never built, so
the encoder pays for 26 layers, not 27.  Weights load with strict keys;
tensors the encoder does not need (text tower, head, upper layers) are listed,
not silently ignored.

This module is the Hugging Face family: a kind that gives ``hf_classes`` (its
transformers config and model class names) and no ``build`` is built by
:func:`build_hf_encoder` and specified by :func:`default_hf_spec` (image size
from the folder's config, normalisation from its ``preprocessor_config.json``
or the kind's ``mean_std``).  SigLIP and CLIP register here exactly as a
plug-in tower would, with their traits (CLIP's CLS token, the ``model_type``
names of their folders, LLaVA export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from asvr.tokenizer.encoders.base import (
    EncoderKind,
    EncoderLoadError,
    EncoderSpec,
    encoder_kind,
    register_encoder,
    resolve_weights,
)

VISION_PREFIX = "vision_model."


def _hf_classes(kind: str):
    import transformers

    k = encoder_kind(kind)
    if k.hf_classes is None:
        raise EncoderLoadError(f"encoder kind {kind!r} is not a Hugging Face vision tower")
    return getattr(transformers, k.hf_classes[0]), getattr(transformers, k.hf_classes[1])


def load_vision_config(kind: str, folder: Path):
    """Vision config from a vision-only or a full (text + vision) config.json."""
    cfg_cls, _ = _hf_classes(kind)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise EncoderLoadError(f"{folder}: no config.json")
    raw = json.loads(cfg_path.read_text())
    if "vision_config" in raw:
        raw = dict(raw["vision_config"])
    raw.pop("model_type", None)
    raw.pop("architectures", None)
    return cfg_cls(**raw)


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise EncoderLoadError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


class HFVisionEncoder(torch.nn.Module):
    """SigLIP or CLIP vision tower truncated at ``feature_layer``; CLIP's CLS token is dropped."""

    def __init__(
        self,
        kind: str,
        folder: str | os.PathLike,
        feature_layer: int = -2,
        state_dict: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        folder = Path(folder)
        cfg = load_vision_config(kind, folder)
        total = cfg.num_hidden_layers
        layer = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
        if not 1 <= layer <= total:
            raise EncoderLoadError(
                f"{kind} has hidden states 1..{total}; feature_layer {feature_layer} is out of range"
            )
        cfg.num_hidden_layers = layer
        _, model_cls = _hf_classes(kind)
        model = model_cls(cfg)
        state = read_safetensors_folder(folder) if state_dict is None else state_dict
        expected = set(model.state_dict().keys())
        state = self._select_vision(state, expected)
        upper = {k for k in state if k not in expected and (i := _layer_index(k)) is not None and i >= layer}
        skipped_other = {k for k in state if k not in expected and k not in upper and _droppable(k)}
        state = {k: v for k, v in state.items() if k not in upper and k not in skipped_other}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise EncoderLoadError(
                f"{folder}: weights do not fit the {kind} config: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
            )
        for k, v in model.state_dict().items():
            if state[k].shape != v.shape:
                raise EncoderLoadError(
                    f"{folder}: {k} has shape {tuple(state[k].shape)}, config wants {tuple(v.shape)}"
                )
        model.load_state_dict(state, strict=True)
        self.skipped = sorted(upper | skipped_other)
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.layer = layer
        self.image_size = cfg.image_size
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.dim = cfg.hidden_size
        self.drop_cls = encoder_kind(kind).drop_cls

    @staticmethod
    def _select_vision(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
        """Vision tensors under the model's own key names.  Full CLIP/SigLIP checkpoints (and
        transformers < 5 vision models) prefix them ``vision_model.``; transformers >= 5
        vision models do not."""
        want = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in expected) else ""
        vision = {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        return {want + k: v for k, v in (vision or state).items()}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.model.dtype), output_hidden_states=True)
        h = out.hidden_states[self.layer]
        if self.drop_cls:
            h = h[:, 1:]
        b, n, c = h.shape
        return h.reshape(b, self.grid[0], self.grid[1], c)


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _droppable(key: str) -> bool:
    """Parts of a vision tower that sit after the chosen layer."""
    return ".post_layernorm." in key or ".head." in key


def build_hf_encoder(spec: EncoderSpec, base: Path | None) -> torch.nn.Module:
    folder = resolve_weights(spec, base)
    if not folder.is_dir():
        raise EncoderLoadError(f"encoder folder not found: {folder}")
    return HFVisionEncoder(spec.kind, folder, spec.feature_layer)


def default_hf_spec(kind: str, weights: str | None, feature_layer: int | None) -> EncoderSpec:
    """Spec for a Hugging Face kind, reading image size and normalisation from its folder."""
    k = encoder_kind(kind)
    if weights is None:
        raise ValueError(f"--encoder-path is required for {kind}")
    folder = Path(weights)
    cfg = load_vision_config(kind, folder)
    mean, std = list(k.mean_std[0]), list(k.mean_std[1])
    pp = folder / "preprocessor_config.json"
    if pp.exists():
        raw = json.loads(pp.read_text())
        mean, std = list(raw.get("image_mean", mean)), list(raw.get("image_std", std))
    return EncoderSpec(
        kind=kind,
        weights=str(folder.resolve()),
        feature_layer=k.default_layer if feature_layer is None else feature_layer,
        image_size=cfg.image_size,
        mean=mean,
        std=std,
    )


register_encoder(
    EncoderKind(
        "siglip",
        hf_classes=("SiglipVisionConfig", "SiglipVisionModel"),
        hf_model_types=("siglip", "siglip_vision_model"),
        llava_export=True,
    )
)
register_encoder(
    EncoderKind(
        "clip",
        hf_classes=("CLIPVisionConfig", "CLIPVisionModel"),
        drop_cls=True,
        mean_std=([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
        hf_model_types=("clip", "clip_vision_model"),
        llava_export=True,
    )
)
