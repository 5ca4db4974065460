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

from asvr.core.atomic import atomic_path, atomic_write
from asvr.tokenizer.encoders.base import EncoderSpec, hash_encoder_weights
from asvr.core.errors import TokenizerError, check_fingerprint

FORMAT_VERSION = 1
TOKENIZER_JSON = "tokenizer.json"
CODEBOOKS_FILE = "codebooks.safetensors"
IMAGE_SIZE_RANGE = (8, 4096)
"""Plausible encoder input sizes (pixels per side): SigLIP/CLIP use 224-896.  A larger value in a
tokenizer.json is refused at load: every image would be resized to it (1e6 px per side is a 3 TB
canvas)."""
MAX_CODEBOOK_SIZE = 2**16
"""Codes are stored as uint16 (contract 2)."""


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
    check_finite(cb, str(out / CODEBOOKS_FILE))
    spec.fingerprint = compute_fingerprint(spec, cb)
    with atomic_path(out / CODEBOOKS_FILE) as tmp:
        save_file({"codebooks": cb}, str(tmp), metadata={"fingerprint": spec.fingerprint})
    atomic_write(out / TOKENIZER_JSON, json.dumps(spec.to_dict(), indent=2) + "\n")
    return spec


def check_finite(cb: torch.Tensor, where: str) -> None:
    """Refuse codebooks holding NaN or Inf (a diverged training): every distance to such a row is
    NaN, and the greedy search then picks codes that depend on the comparison order.  Checked at
    save and at load, independently of the fingerprint (which a bad file can carry recomputed)."""
    bad = ~torch.isfinite(cb).all(dim=-1)
    if bool(bad.any()):
        d, k = (int(i) for i in bad.nonzero()[0])
        raise TokenizerError(
            f"{where}: {int(bad.sum())} codebook rows hold NaN or Inf values (first: depth {d}, code {k}); "
            "the codebook training diverged: train it again"
        )


_ASVR_KEYS = {"format_version", "encoder", "grid", "depth", "codebook_size"}
"""Keys only an ASVR tokenizer.json has (a Hugging Face text tokenizer's has model, added_tokens, ...)."""


def _spec_from_json(path: Path, js: Path) -> TokenizerSpec:
    try:
        d = json.loads(js.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{js}: malformed ({e})") from None
    if not isinstance(d, dict) or not _ASVR_KEYS & set(d):
        hf = isinstance(d, dict) and bool({"model", "added_tokens", "normalizer"} & set(d))
        raise TokenizerError(
            f"{path} is not an ASVR tokenizer artifact ({TOKENIZER_JSON} has none of "
            f"{', '.join(sorted(_ASVR_KEYS))}"
            + ("; it is a Hugging Face text tokenizer's" if hf else "")
            + "): pass the folder written by asvr-tokenizer train or import-dualtoken"
        )
    try:
        spec = TokenizerSpec.from_dict(d)
    except (TypeError, KeyError, ValueError) as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"{js}: malformed ({e})") from None
    _check_plausible(spec, js)
    return spec


def _check_plausible(spec: TokenizerSpec, js: Path) -> None:
    """Numbers a hand-edited or foreign tokenizer.json may get wrong, refused before they size anything."""

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    lo, hi = IMAGE_SIZE_RANGE
    size = spec.encoder.image_size
    if not whole(size) or not lo <= size <= hi:
        raise TokenizerError(f"{js}: encoder image_size {size!r} is implausible (expected {lo}..{hi} pixels)")
    for name, v in (("dim", spec.dim), ("depth", spec.depth), ("codebook_size", spec.codebook_size)):
        if not whole(v) or v < 1:
            raise TokenizerError(f"{js}: {name} {v!r} must be a positive integer")
    if len(spec.grid) != 2 or not all(whole(x) and x >= 1 for x in spec.grid):
        raise TokenizerError(f"{js}: grid {list(spec.grid)} must be two positive integers")
    if spec.codebook_size > MAX_CODEBOOK_SIZE:
        raise TokenizerError(
            f"{js}: codebook_size {spec.codebook_size} > {MAX_CODEBOOK_SIZE} (codes are stored as uint16)"
        )


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """The writers' check (``asvr-tokenizer train``, ``import-dualtoken``), before any work: ``out``
    must not hold a tokenizer already unless ``overwrite`` (replacing it orphans every shard, index
    and run made with it: their fingerprints no longer match)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} exists and is not a folder")
    held = [n for n in (TOKENIZER_JSON, CODEBOOKS_FILE) if (out / n).exists()]
    if held and not overwrite:
        try:
            what = f"the tokenizer {json.loads((out / TOKENIZER_JSON).read_text())['fingerprint'][:12]}"
        except Exception:  # noqa: BLE001 - any other tokenizer.json (a text tokenizer, a broken file)
            what = held[0]
        raise TokenizerError(
            f"--out {out} already holds {what}; replacing it makes every shard, index and run made with it "
            "unusable: pass --overwrite to replace it, or choose another --out"
        )


def load_artifact(path: str | os.PathLike, verify: bool = True) -> tuple[TokenizerSpec, torch.Tensor]:
    path = Path(path)
    js = path / TOKENIZER_JSON
    if not js.exists():
        raise TokenizerError(f"{path} is not a tokenizer directory (no {TOKENIZER_JSON})")
    spec = _spec_from_json(path, js)
    cbf = path / CODEBOOKS_FILE
    if not cbf.exists():
        raise TokenizerError(f"{path}: missing {CODEBOOKS_FILE}")
    try:
        tensors = load_file(str(cbf))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a cut or foreign file
        why = str(e).splitlines()[0] if str(e) else ""
        raise TokenizerError(
            f"{cbf}: unreadable ({type(e).__name__}: {why}); the file is truncated or not safetensors"
        ) from None
    if set(tensors) != {"codebooks"}:
        raise TokenizerError(f"{cbf}: expected one tensor 'codebooks', found {sorted(tensors)}")
    cb = tensors["codebooks"]
    want = (1 if spec.shared_codebook else spec.depth, spec.codebook_size, spec.dim)
    if tuple(cb.shape) != want:
        raise TokenizerError(f"{cbf}: codebooks have shape {tuple(cb.shape)}, tokenizer.json says {want}")
    if cb.dtype != torch.float32:
        raise TokenizerError(f"{cbf}: codebooks are {cb.dtype}, expected float32")
    check_finite(cb, str(cbf))
    if verify:
        check_fingerprint(
            compute_fingerprint(spec, cb),
            spec.fingerprint,
            f"{path}'s codebooks and encoder",
            f"its {TOKENIZER_JSON}",
            "the codebooks or tokenizer.json were changed",
        )
    return spec, cb
