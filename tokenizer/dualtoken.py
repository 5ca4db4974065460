"""Import the published DualToken / ASVR semantic tokenizer.

The checkpoint (``{"state_dict": {...}}``) holds a whole RQ-VAE-SigLIP:
``siglip_model.vision_model.*`` (the SigLIP vision tower, possibly
fine-tuned), ``quantizer_semantic.codebooks.{i}.weight`` ``[K + 1, C]`` (the
last row is RQ-VAE's padding embedding, never a code) and parts we do not
need (pixel quantizer, pixel decoder, text tower, ...), which are listed and
skipped.  The semantic codes are the greedy RVQ of the second to last hidden
state (``feature_layer=-2``: layer 26 of so400m's 27), so only the layers up
to it are written.

The artifact is self-contained: ``TOK/encoder/`` holds the SigLIP
``config.json`` (copied from ``--siglip``) and ``model.safetensors`` with the
checkpoint's vision weights (``vision_model.*``); ``EncoderSpec.weights`` is
the relative ``"encoder"``.  Everything is checked strictly: a missing key, a
wrong shape, or a config that disagrees (hidden size vs ``C``, grid
``image_size / patch_size`` vs ``code_shape``) is an error, never a silent
random init.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from asvr.tokenizer.artifact import TokenizerError, TokenizerSpec, save_artifact
from asvr.core.atomic import atomic_dir
from asvr.tokenizer.encoders.base import EncoderLoadError, default_encoder_spec
from asvr.tokenizer.encoders.hf_vision import _layer_index, load_vision_config

CODEBOOK_KEY = "quantizer_semantic.codebooks.{}.weight"
_CODEBOOK_RE = re.compile(r"quantizer_semantic\.codebooks\.(\d+)\.weight")
VISION_PREFIX = "siglip_model."
FEATURE_LAYER = -2
ENCODER_DIR = "encoder"


class DualTokenImportError(TokenizerError):
    pass


@dataclass(frozen=True)
class RQSiglipConfig:
    code_shape: tuple[int, int, int]
    latent_shape: tuple[int, int, int]
    n_embed: int
    shared_codebook: bool

    @property
    def depth(self) -> int:
        return self.code_shape[2]

    @property
    def dim(self) -> int:
        return self.latent_shape[2]


@dataclass
class ImportResult:
    spec: TokenizerSpec
    vision_tensors: int
    skipped: dict[str, int] = field(default_factory=dict)
    """prefix -> number of checkpoint tensors not needed"""


def _find_key(obj, key: str):
    if isinstance(obj, dict):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def read_rq_config(folder: str | os.PathLike) -> RQSiglipConfig:
    """The ``rqvaesiglip`` block of a DualToken config folder (at top level or nested)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise DualTokenImportError(f"{folder}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DualTokenImportError(f"{path}: not JSON ({e})") from None
    rq = _find_key(raw, "rqvaesiglip")
    if rq is None and isinstance(raw, dict) and "code_shape" in raw:
        rq = raw
    if rq is None:
        raise DualTokenImportError(f"{path}: no 'rqvaesiglip' section")
    try:
        # Both lengths are checked (== 3) below, with a clearer message than the constructor's.
        code_shape = cast("tuple[int, int, int]", tuple(int(v) for v in rq["code_shape"]))
        latent_shape = cast("tuple[int, int, int]", tuple(int(v) for v in rq["latent_shape"]))
        cfg = RQSiglipConfig(
            code_shape=code_shape,
            latent_shape=latent_shape,
            n_embed=int(rq["n_embed"]),
            shared_codebook=bool(rq.get("shared_codebook", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DualTokenImportError(f"{path}: rqvaesiglip needs code_shape, latent_shape, n_embed ({e!r})") from None
    if len(code_shape) != 3 or len(latent_shape) != 3 or code_shape[:2] != latent_shape[:2]:
        raise DualTokenImportError(
            f"{path}: code_shape {list(code_shape)} and latent_shape {list(latent_shape)} "
            "must be [H, W, D] and [H, W, C] on the same grid"
        )
    return cfg


def load_state(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DualTokenImportError(f"{checkpoint}: no such file") from None
    except Exception as e:  # noqa: BLE001 - pickle / zip errors of a bad file
        raise DualTokenImportError(f"{checkpoint}: cannot load ({type(e).__name__}: {e})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DualTokenImportError(f"{checkpoint}: expected {{'state_dict': {{name: tensor}}}}")
    return state


def _prefix(key: str, vision_layers: int) -> str:
    parts = key.split(".")
    if key.startswith(VISION_PREFIX + "vision_model.encoder.layers.") and (_layer_index(key) or 0) >= vision_layers:
        return f"{VISION_PREFIX}vision_model.encoder.layers.{vision_layers}+"
    return ".".join(parts[:2]) if parts[0] in ("siglip_model", "quantizer_semantic") else parts[0]


def extract_codebooks(state: dict[str, torch.Tensor], rq: RQSiglipConfig) -> tuple[torch.Tensor, set[str]]:
    """-> (float32 ``[D or 1, K, C]`` without the pad row, keys used)."""
    want = (rq.n_embed + 1, rq.dim)
    n = 1 if rq.shared_codebook else rq.depth
    books, used = [], set()
    for i in range(n):
        key = CODEBOOK_KEY.format(i)
        if key not in state:
            raise DualTokenImportError(f"checkpoint has no {key}")
        if tuple(state[key].shape) != want:
            raise DualTokenImportError(
                f"{key} has shape {tuple(state[key].shape)}, config wants {want} (n_embed + 1 pad row, C)"
            )
        books.append(state[key][: rq.n_embed].float())
        used.add(key)
    for key in state:
        m = _CODEBOOK_RE.fullmatch(key)
        if m is None or key in used:
            continue
        i = int(m.group(1))
        if not rq.shared_codebook or i >= rq.depth:
            raise DualTokenImportError(
                f"checkpoint has {key} but the config has depth {rq.depth}"
                f"{' and a shared codebook' if rq.shared_codebook else ''}"
            )
        if not torch.equal(state[key], state[CODEBOOK_KEY.format(0)]):
            raise DualTokenImportError(f"shared_codebook is set but {key} differs from codebook 0")
        used.add(key)  # the same module registered at every depth
    return torch.stack(books).contiguous(), used


def extract_vision(
    state: dict[str, torch.Tensor], siglip_dir: Path, rq: RQSiglipConfig
) -> tuple[dict[str, torch.Tensor], set[str], int]:
    """Vision weights the truncated tower needs, as ``vision_model.*``; -> (weights, keys used, layers)."""
    from transformers import SiglipVisionModel

    try:
        cfg = load_vision_config("siglip", siglip_dir)
    except (EncoderLoadError, TypeError, ValueError) as e:
        raise DualTokenImportError(f"{siglip_dir}: bad SigLIP config ({e})") from None
    side = cfg.image_size // cfg.patch_size
    if cfg.hidden_size != rq.dim:
        raise DualTokenImportError(f"SigLIP hidden size {cfg.hidden_size} != codebook dim C={rq.dim}")
    if (side, side) != tuple(rq.code_shape[:2]):
        raise DualTokenImportError(
            f"SigLIP grid {side}x{side} (image {cfg.image_size} / patch {cfg.patch_size}) "
            f"!= code_shape {rq.code_shape[0]}x{rq.code_shape[1]}"
        )
    layers = cfg.num_hidden_layers + 1 + FEATURE_LAYER
    cfg.num_hidden_layers = layers
    with torch.device("meta"):  # shapes only: no 400M-parameter allocation
        model_keys = {k: tuple(v.shape) for k, v in SiglipVisionModel(cfg).state_dict().items()}
    # transformers >= 5 names the tower's tensors without the "vision_model." prefix
    expected = {k.removeprefix("vision_model."): v for k, v in model_keys.items()}
    out, used = {}, set()
    for k, shape in expected.items():
        src = VISION_PREFIX + "vision_model." + k
        if src not in state:
            raise DualTokenImportError(f"checkpoint has no {src}")
        if tuple(state[src].shape) != shape:
            raise DualTokenImportError(f"{src} has shape {tuple(state[src].shape)}, SigLIP config wants {shape}")
        out["vision_model." + k] = state[src].contiguous()
        used.add(src)
    return out, used, layers


def _write_encoder(out: Path, siglip_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out / ENCODER_DIR) as tmp:
        shutil.copyfile(siglip_dir / "config.json", tmp / "config.json")
        if (siglip_dir / "preprocessor_config.json").exists():
            shutil.copyfile(siglip_dir / "preprocessor_config.json", tmp / "preprocessor_config.json")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": "dualtoken-import"})


def import_dualtoken(
    config_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    siglip_dir: str | os.PathLike,
    out: str | os.PathLike,
    preprocess: str = "square",
) -> ImportResult:
    """Convert a DualToken/ASVR checkpoint to a tokenizer directory at ``out``."""
    siglip_dir, out = Path(siglip_dir), Path(out)
    rq = read_rq_config(config_dir)
    state = load_state(checkpoint)
    codebooks, used_cb = extract_codebooks(state, rq)
    vision, used_v, layers = extract_vision(state, siglip_dir, rq)
    skipped = Counter(_prefix(k, layers) for k in state if k not in used_cb and k not in used_v)
    _write_encoder(out, siglip_dir, vision)
    enc = default_encoder_spec("siglip", str(out / ENCODER_DIR), FEATURE_LAYER)
    enc.weights = ENCODER_DIR  # relative to the artifact: it moves as one folder
    spec = TokenizerSpec(
        encoder=enc,
        preprocess=preprocess,
        grid=(rq.code_shape[0], rq.code_shape[1]),
        dim=rq.dim,
        depth=rq.depth,
        codebook_size=rq.n_embed,
        shared_codebook=rq.shared_codebook,
    )
    spec = save_artifact(out, spec, codebooks)
    return ImportResult(spec=spec, vision_tensors=len(vision), skipped=dict(sorted(skipped.items())))
