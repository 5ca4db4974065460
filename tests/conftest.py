"""Shared fixtures: a real (embedded EfficientNet-Lite0) tokenizer with small
random codebooks, and generated images.  Nothing is downloaded."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

from asvr.tokenizer.encoders.base import default_encoder_spec


def make_image(seed: int, size=(96, 72), mode="RGB") -> Image.Image:
    """Smooth random picture (not noise: encoders see structure)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    arr = ((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def image_bytes(seed: int, fmt="JPEG", size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    make_image(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def write_image_folder(root: Path, n: int, start: int = 0, sub: bool = True) -> list[str]:
    keys = []
    for i in range(start, start + n):
        rel = f"d{i % 3}/img_{i:05d}.jpg" if sub else f"img_{i:05d}.jpg"
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(image_bytes(i, size=(64 + 8 * (i % 5), 48 + 8 * (i % 3))))
        keys.append(rel)
    return keys


def build_tiny_tokenizer(out: Path, depth=3, k=32, seed=0, preprocess="square") -> Path:
    """Real EfficientNet-Lite0 encoder (7x7x320) + random codebooks scaled to its features."""
    enc = default_encoder_spec()
    g = torch.Generator().manual_seed(seed)
    cb = (
        torch.randn(depth, k, 320, generator=g)
        * torch.tensor([1.0, 0.5, 0.25][:depth] + [0.1] * max(0, depth - 3))[:, None, None]
    )
    spec = TokenizerSpec(
        encoder=enc, preprocess=preprocess, grid=(7, 7), dim=320, depth=depth, codebook_size=k, shared_codebook=False
    )
    save_artifact(out, spec, cb)
    return out


@pytest.fixture(scope="session", autouse=True)
def _weights_hash_cache(tmp_path_factory):
    """Tokenizer loads record their weights' hashes here (asvr.tokenizer.encoders.weights_hash), not in
    the user's ~/.cache; subprocesses and Ray workers started by the tests inherit it."""
    os.environ.setdefault("ASVR_HASH_CACHE", str(tmp_path_factory.mktemp("weights-sha256")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir) -> SemanticTokenizer:
    return SemanticTokenizer.load(tiny_tokenizer_dir)


def tokenize_cmd(images, tokenizer, out, *extra) -> list[str]:
    """``asvr-pipeline tokenize`` as a subprocess command line (this Python, no progress bar)."""
    return [
        sys.executable,
        "-m",
        "asvr.pipeline.cli",
        "tokenize",
        str(images),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--no-progress",
        *map(str, extra),
    ]
