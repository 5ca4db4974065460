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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.spec import CODEBOOKS_FILE, TOKENIZER_JSON, TokenizerSpec, read_spec
from asvr.tokenizer.encoders.base import encoder_kind, hash_encoder_weights
from asvr.core.errors import TokenizerError, check_fingerprint


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
    spec = read_spec(path)
    encoder_kind(spec.encoder.kind)  # an unknown kind is an EncoderLoadError, never a fallback
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
