"""``asvr-tokenizer train``: encode a folder of images with a frozen encoder,
sample feature vectors, train RVQ codebooks with faiss, write the artifact."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TypeVar

import torch

from asvr.tokenizer.artifact import TokenizerSpec, refuse_existing, save_artifact
from asvr.core.config_cli import add_command
from asvr.tokenizer.cli import EncodingOptions
from asvr.core.errors import CLIError
from asvr.tokenizer.rvq.training import (
    CodebookTrainConfig,
    Failure,
    TrainingError,
    iter_features,
    list_images,
    pick,
    sample_vectors,
    set_threads,
    train_codebooks,
)
from asvr.tokenizer.encoders.base import build_encoder, default_encoder_spec, encoder_geometry, encoder_kinds
from asvr.tokenizer.preprocess import PREPROCESS_MODES, PreprocessConfig


T = TypeVar("T")


def _encoder_kinds() -> list[str]:
    return list(encoder_kinds())


@dataclass(kw_only=True)
class TrainOptions:
    images: list[str] = field(metadata={"metavar": "DIR"})
    """Image folders (searched recursively)."""
    encoder: str = field(default="efficientnet_lite0", metadata={"choices": _encoder_kinds})
    """Frozen encoder; efficientnet_lite0 is embedded (7x7x320 at 224 px)."""
    encoder_path: str | None = field(default=None, metadata={"metavar": "HFDIR"})
    """Local Hugging Face folder for siglip/clip."""
    feature_layer: int | None = None
    """Block (efficientnet, default -1) or hidden-state index (siglip/clip, default -2)."""
    codebooks: CodebookTrainConfig = field(metadata={"prefix": ""})
    max_images: int | None = None
    """Use a seeded random subset of the images."""
    max_vectors: int | None = None
    """Train on a seeded random subset of feature vectors."""
    preprocess: str = field(default="square", metadata={"choices": PREPROCESS_MODES})
    """Square resize, or pad to square with the mean colour (recorded in the artifact)."""
    encoding: EncodingOptions = field(default_factory=EncodingOptions, metadata={"prefix": ""})
    out: str = field(metadata={"metavar": "TOK"})
    """Tokenizer directory to write."""
    overwrite: bool = False
    """Replace a tokenizer already in --out."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        TrainOptions,
        groups={"codebooks": "options", "encoding": "options"},
        help=help_,
        description="Encode images with a frozen encoder, sample feature vectors and train residual-quantization "
        "codebooks with faiss. The result is a tokenizer directory (tokenizer.json + codebooks.safetensors) whose "
        "codes are the exact greedy RVQ of the encoder's features.",
    ).set_defaults(func=run)


def run(args: TrainOptions) -> int:
    refuse_existing(args.out, args.overwrite)  # before the (long) encoding and training
    enc = args.encoding
    set_threads(enc.threads)
    t0 = time.perf_counter()
    cfg = replace(args.codebooks, seed=enc.seed)
    enc_spec = _one_line(ValueError, default_encoder_spec, args.encoder, args.encoder_path, args.feature_layer)
    paths = _images(args)

    torch.manual_seed(enc.seed)
    encoder = build_encoder(enc_spec)
    grid, dim = encoder_geometry(encoder)
    _check_enough_vectors(cfg, len(paths), grid, args.max_vectors)  # fail before the (long) encoding
    pcfg = PreprocessConfig.for_encoder(enc_spec, args.preprocess)
    failures: list[Failure] = []
    features = iter_features(encoder, paths, pcfg, batch_size=enc.batch_size, failures=failures)
    x = _one_line(TrainingError, sample_vectors, features, len(paths), args.max_vectors, enc.seed)
    t_enc = time.perf_counter() - t0
    _print_encoded(cfg, len(paths), failures, x, t_enc)
    res = _one_line(TrainingError, train_codebooks, x, cfg)

    spec = TokenizerSpec(
        encoder=enc_spec,
        preprocess=args.preprocess,
        grid=grid,
        dim=dim,
        depth=cfg.depth,
        codebook_size=cfg.codebook_size,
        shared_codebook=cfg.shared,
    )
    spec = save_artifact(args.out, spec, torch.from_numpy(res.codebooks))
    summary = {
        "out": str(Path(args.out)),
        "fingerprint": spec.fingerprint,
        "images": len(paths) - len(failures),
        "skipped": len(failures),
        "vectors": int(x.shape[0]),
        "method": cfg.method,
        "shared": cfg.shared,
        "train_rel_error_per_depth": [round(e, 5) for e in res.rel_error],
        "seconds": {
            "encode": round(t_enc, 1),
            "train": round(res.seconds, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    print(json.dumps(summary))
    return 0


def _one_line(errors: type[Exception], step: Callable[..., T], *args) -> T:
    """``step(*args)``, an error of type ``errors`` re-raised as the one-line :class:`CLIError`."""
    try:
        return step(*args)
    except errors as e:
        raise CLIError(str(e)) from None


def _images(args: TrainOptions) -> list[Path]:
    """The training images (a seeded subset with ``--max-images``); none found is an error."""
    paths = _one_line(TrainingError, lambda: pick(list_images(args.images), args.max_images, args.encoding.seed))
    if not paths:
        raise CLIError(f"no images found under {' '.join(args.images)}")
    return paths


def _check_enough_vectors(cfg: CodebookTrainConfig, images: int, grid, max_vectors: int | None) -> None:
    most = images * grid[0] * grid[1]
    most = most if max_vectors is None else min(most, max_vectors)
    if cfg.codebook_size > most:
        raise CLIError(
            f"codebook size {cfg.codebook_size} > {most} training vectors ({images} images x "
            f"{grid[0]}x{grid[1]}): use more images/vectors or a smaller --codebook-size"
        )


def _print_encoded(cfg: CodebookTrainConfig, images: int, failures: list[Failure], x, seconds: float) -> None:
    if failures:
        f = failures[0]
        print(f"skipped {len(failures)} unreadable images (first: {f.path}: {f.reason})", file=sys.stderr)
    print(
        f"encoded {images - len(failures)} images -> {x.shape[0]} vectors of dim {x.shape[1]} "
        f"in {seconds:.1f}s; training {cfg.method}{' shared' if cfg.shared else ''} D={cfg.depth} K={cfg.codebook_size}",
        file=sys.stderr,
    )
