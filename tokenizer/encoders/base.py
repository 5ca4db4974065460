"""Frozen image encoders behind one interface: pixels ``[B, 3, S, S]`` ->
feature grid ``[B, H, W, C]``; this module is the kind record and its registry.

An :class:`EncoderKind` carries everything the rest of the project asks about a
kind, so nothing outside this package compares kind names: how to build it and
its default spec, whether it has a CLS token (``--vision-tower-select
cls_patch``, the LLaVA export's select strategy), its default feature layer, its
normalisation, the ``model_type`` names of its Hugging Face folders
(``--vision-tower DIR``), whether transformers' LLaVA can hold it (export), and
where ``package:`` weights live.  An unknown kind is an error everywhere, never a
silent fallback to CLIP classes.

The built-ins are plug-ins like any other, one module each: ``efficientnet.py``
(the embedded default), ``hf_vision.py`` (``siglip``, ``clip``; the Hugging Face
family: a kind that gives only ``hf_classes`` is built there), ``pixels.py``.
Adding a kind is one module in ``asvr/tokenizer/encoders/`` (and its test) that
calls :func:`register_encoder`: the registry imports every module of the package
on the first lookup, so ``asvr-tokenizer train --encoder`` lists it and
artifacts, towers and exports use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, cast

import torch

from asvr.core.registry import Registry
from asvr.core.spec import EncoderSpec
from asvr.tokenizer.encoders.weights_hash import cache_dir, cached_digest
from asvr.core.errors import AsvrError

NO_WEIGHTS_PREFIX = "none:"
"""``weights`` of a kind without weights (``none:pixels``): its hash names the kind and layer."""
PACKAGE_PREFIX = "package:"
"""``weights`` of a kind whose weights ship in a Python package (:attr:`EncoderKind.package_weights`)."""


class EncoderLoadError(AsvrError):
    pass


# --------------------------------------------------------------------------- the kind registry
@dataclass(frozen=True)
class EncoderKind:
    """One encoder kind.  A Hugging Face vision tower gives ``hf_classes`` (the transformers
    config and model class names) and is built by :mod:`asvr.tokenizer.encoders.hf_vision`; any
    other kind gives ``build(spec, base) -> module`` and ``default_spec(weights, feature_layer)``."""

    name: str
    hf_classes: tuple[str, str] | None = None
    drop_cls: bool = False
    """The tower prepends a CLS token to the patch tokens (CLIP): dropped from the grid, kept
    first by ``--vision-tower-select cls_patch``, dropped by an exported LLaVA's ``default`` strategy."""
    mean_std: tuple[list[float], list[float]] = ([0.5] * 3, [0.5] * 3)
    """Normalisation when the folder has no preprocessor_config.json."""
    default_layer: int = -2
    """``feature_layer`` when none is given (Hugging Face towers: the second to last hidden state)."""
    hf_model_types: tuple[str, ...] = ()
    """``model_type`` values of a Hugging Face ``config.json`` that name this kind (``--vision-tower DIR``)."""
    llava_export: bool = False
    """transformers' ``LlavaForConditionalGeneration`` can hold this tower (``asvr-export --hf``)."""
    package_weights: Callable[[], Path] | None = None
    """Where ``package:...`` weights lie (a kind whose weights ship in a Python package)."""
    build: Callable[["EncoderSpec", Path | None], torch.nn.Module] | None = None
    default_spec: Callable[[str | None, int | None], "EncoderSpec"] | None = None


KINDS: Registry[EncoderKind] = Registry(
    "encoder kind", "asvr.tokenizer.encoders", "", first=("efficientnet_lite0", "siglip", "clip")
)


def register_encoder(kind: EncoderKind) -> EncoderKind:
    if kind.hf_classes is None and (kind.build is None or kind.default_spec is None):
        raise ValueError(f"encoder kind {kind.name!r} needs hf_classes, or build and default_spec")
    return KINDS.register(kind.name, kind)


def encoder_kinds() -> dict[str, EncoderKind]:
    """name -> kind: every module of ``asvr.tokenizer.encoders`` (imported once), built-ins first."""
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


# --------------------------------------------------------------------------- factory
def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def kind_of_model_type(model_type: str) -> EncoderKind | None:
    """The kind whose Hugging Face folders say ``model_type`` (None: no kind reads them)."""
    return next((k for k in encoder_kinds().values() if model_type in k.hf_model_types), None)


def resolve_weights(spec: EncoderSpec, base: Path | None) -> Path:
    if spec.weights.startswith(PACKAGE_PREFIX):
        kind = encoder_kind(spec.kind)
        if kind.package_weights is None:
            raise EncoderLoadError(f"encoder kind {spec.kind!r} has no packaged weights ({spec.weights})")
        return kind.package_weights()
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
    from asvr.tokenizer.encoders.hf_vision import build_hf_encoder  # the Hugging Face family

    return build_hf_encoder(spec, base)


def default_encoder_spec(
    kind: str = "efficientnet_lite0", weights: str | None = None, feature_layer: int | None = None
) -> EncoderSpec:
    """Spec for a kind (a Hugging Face kind reads image size and normalisation from its folder)."""
    k = encoder_kind(kind)
    if k.default_spec is not None:
        return k.default_spec(weights, feature_layer)
    from asvr.tokenizer.encoders.hf_vision import default_hf_spec

    return default_hf_spec(kind, weights, feature_layer)
