"""``asvr-tokenizer train``: encode a folder of images with a frozen encoder,
sample feature vectors, train RVQ codebooks with faiss, write the artifact."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from asvr.tokenizer.artifact import TokenizerSpec, refuse_existing, save_artifact
from asvr.tokenizer.cli import add_encoding_args
from asvr.core.errors import CLIError
from asvr.tokenizer.rvq.training import (
    TRAIN_METHODS,
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


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Encode images with a frozen encoder, sample feature vectors and train residual-quantization codebooks "
        "with faiss. The result is a tokenizer directory (tokenizer.json + codebooks.safetensors) whose codes "
        "are the exact greedy RVQ of the encoder's features."
    )
    p.add_argument("--images", nargs="+", required=True, metavar="DIR", help="image folders (searched recursively)")
    p.add_argument(
        "--encoder",
        choices=list(encoder_kinds()),
        default="efficientnet_lite0",
        help="frozen encoder; efficientnet_lite0 is embedded (7x7x320 at 224 px)",
    )
    p.add_argument("--encoder-path", metavar="HFDIR", help="local Hugging Face folder for siglip/clip")
    p.add_argument(
        "--feature-layer",
        type=int,
        default=None,
        help="block (efficientnet, default -1) or hidden-state index (siglip/clip, default -2)",
    )
    p.add_argument("--depth", type=int, required=True, help="RVQ depth D")
    p.add_argument("--codebook-size", type=int, required=True, help="codes per depth K (a power of two for rq)")
    p.add_argument("--shared", action="store_true", help="one codebook shared by every depth (pooled k-means)")
    p.add_argument(
        "--method",
        choices=TRAIN_METHODS,
        default="kmeans",
        help="rq: faiss.ResidualQuantizer; kmeans: faiss.Kmeans per depth + refinement rounds",
    )
    p.add_argument("--beam-size", type=int, default=1, help="rq: training beam (1 = greedy, as the encoder)")
    p.add_argument("--refine-rounds", type=int, default=3, help="kmeans/shared: refinement rounds")
    p.add_argument("--max-images", type=int, default=None, help="use a seeded random subset of the images")
    p.add_argument("--max-vectors", type=int, default=None, help="train on a seeded random subset of feature vectors")
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="square",
        help="square resize, or pad to square with the mean colour (recorded in the artifact)",
    )
    add_encoding_args(p)
    p.add_argument("--out", required=True, metavar="TOK", help="tokenizer directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_existing(args.out, args.overwrite)  # before the (long) encoding and training
    set_threads(args.threads)
    t0 = time.perf_counter()
    try:
        cfg = CodebookTrainConfig(
            depth=args.depth,
            codebook_size=args.codebook_size,
            shared=args.shared,
            method=args.method,
            beam_size=args.beam_size,
            refine_rounds=args.refine_rounds,
            seed=args.seed,
        )
        enc_spec = default_encoder_spec(args.encoder, args.encoder_path, args.feature_layer)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        paths = pick(list_images(args.images), args.max_images, args.seed)
    except TrainingError as e:
        raise CLIError(str(e)) from None
    if not paths:
        raise CLIError(f"no images found under {' '.join(args.images)}")

    torch.manual_seed(args.seed)
    encoder = build_encoder(enc_spec)
    grid, dim = encoder_geometry(encoder)
    most = len(paths) * grid[0] * grid[1]
    most = most if args.max_vectors is None else min(most, args.max_vectors)
    if cfg.codebook_size > most:  # fail before the (long) encoding
        raise CLIError(
            f"codebook size {cfg.codebook_size} > {most} training vectors ({len(paths)} images x "
            f"{grid[0]}x{grid[1]}): use more images/vectors or a smaller --codebook-size"
        )
    pcfg = PreprocessConfig.for_encoder(enc_spec, args.preprocess)
    failures: list[Failure] = []
    try:
        x = sample_vectors(
            iter_features(encoder, paths, pcfg, batch_size=args.batch_size, failures=failures),
            len(paths),
            args.max_vectors,
            args.seed,
        )
    except TrainingError as e:
        raise CLIError(str(e)) from None
    t_enc = time.perf_counter() - t0
    if failures:
        f = failures[0]
        print(f"skipped {len(failures)} unreadable images (first: {f.path}: {f.reason})", file=sys.stderr)
    print(
        f"encoded {len(paths) - len(failures)} images -> {x.shape[0]} vectors of dim {x.shape[1]} "
        f"in {t_enc:.1f}s; training {cfg.method}{' shared' if cfg.shared else ''} D={cfg.depth} K={cfg.codebook_size}",
        file=sys.stderr,
    )
    try:
        res = train_codebooks(x, cfg)
    except TrainingError as e:
        raise CLIError(str(e)) from None

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
