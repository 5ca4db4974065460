"""The tokenizer artifact (docs/ARCHITECTURE.md, contract 1): a directory with
``tokenizer.json`` and ``codebooks.safetensors`` (float32 ``[D or 1, K, C]``).

The fingerprint is sha256 over the codebook bytes, the encoder's weight
files, and the canonical JSON of everything that changes pixels or features
(encoder kind, layer, image size, normalisation, resample).  The preprocess
*mode* (square/pad) is recorded beside it, not in it: the same tokenizer serves
both modes, and shards record the mode they were made with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write
from .encoders import EncoderSpec, hash_encoder_weights
from .errors import TokenizerError, check_fingerprint

FORMAT_VERSION = 1
TOKENIZER_JSON = "tokenizer.json"
CODEBOOKS_FILE = "codebooks.safetensors"


@dataclass
class TokenizerSpec:
    encoder: EncoderSpec
    preprocess: str
    grid: tuple[int, int]
    dim: int
    depth: int
    codebook_size: int
    shared_codebook: bool
    fingerprint: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerSpec":
        if d.get("format_version") != FORMAT_VERSION:
            raise TokenizerError(f"tokenizer format_version {d.get('format_version')} is not {FORMAT_VERSION}")
        d = dict(d)
        d["encoder"] = EncoderSpec(**d["encoder"])
        d["grid"] = tuple(d["grid"])
        return cls(**d)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def codes_per_image(self) -> int:
        return self.tokens_per_image * self.depth


def compute_fingerprint(spec: TokenizerSpec, codebooks: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(codebooks.detach().float().contiguous().cpu().numpy().tobytes())
    h.update(spec.encoder.weights_sha256.encode())
    enc = spec.encoder
    pixels = {
        "kind": enc.kind,
        "feature_layer": enc.feature_layer,
        "image_size": enc.image_size,
        "mean": enc.mean,
        "std": enc.std,
        "resample": enc.resample,
        "depth": spec.depth,
        "shared": spec.shared_codebook,
    }
    h.update(json.dumps(pixels, sort_keys=True).encode())
    return h.hexdigest()


def save_artifact(out: str | os.PathLike, spec: TokenizerSpec, codebooks: torch.Tensor) -> TokenizerSpec:
    """Write the artifact; the fingerprint is (re)computed here. Returns the saved spec."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out
    if not spec.encoder.weights_sha256:
        spec.encoder.weights_sha256 = hash_encoder_weights(spec.encoder, base)
    cb = codebooks.detach().float().contiguous().cpu()
    want = (1 if spec.shared_codebook else spec.depth, spec.codebook_size, spec.dim)
    if tuple(cb.shape) != want:
        raise TokenizerError(f"codebooks have shape {tuple(cb.shape)}, spec wants {want}")
    spec.fingerprint = compute_fingerprint(spec, cb)
    with atomic_path(out / CODEBOOKS_FILE) as tmp:
        save_file({"codebooks": cb}, str(tmp), metadata={"fingerprint": spec.fingerprint})
    atomic_write(out / TOKENIZER_JSON, json.dumps(spec.to_dict(), indent=2) + "\n")
    return spec


def load_artifact(path: str | os.PathLike, verify: bool = True) -> tuple[TokenizerSpec, torch.Tensor]:
    path = Path(path)
    js = path / TOKENIZER_JSON
    if not js.exists():
        raise TokenizerError(f"{path} is not a tokenizer directory (no {TOKENIZER_JSON})")
    try:
        spec = TokenizerSpec.from_dict(json.loads(js.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise TokenizerError(f"{js}: malformed ({e})") from None
    cbf = path / CODEBOOKS_FILE
    if not cbf.exists():
        raise TokenizerError(f"{path}: missing {CODEBOOKS_FILE}")
    tensors = load_file(str(cbf))
    if set(tensors) != {"codebooks"}:
        raise TokenizerError(f"{cbf}: expected one tensor 'codebooks', found {sorted(tensors)}")
    cb = tensors["codebooks"]
    want = (1 if spec.shared_codebook else spec.depth, spec.codebook_size, spec.dim)
    if tuple(cb.shape) != want:
        raise TokenizerError(f"{cbf}: codebooks have shape {tuple(cb.shape)}, tokenizer.json says {want}")
    if verify:
        check_fingerprint(
            compute_fingerprint(spec, cb),
            spec.fingerprint,
            f"{path}'s codebooks and encoder",
            f"its {TOKENIZER_JSON}",
            "the codebooks or tokenizer.json were changed",
        )
    return spec, cb
