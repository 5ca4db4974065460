"""``asvr-tokenizer validate``: reconstruction error, cosine, utilisation and
usage entropy per depth on a folder of (held-out) images, with plots."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asvr.core.config_cli import add_command
from asvr.tokenizer.cli import EncodingOptions
from asvr.core.atomic import atomic_write
from asvr.core.errors import CLIError
from asvr.tokenizer.rvq.training import TrainingError, iter_features, list_images, pick, set_threads
from asvr.tokenizer.model import SemanticTokenizer
from asvr.tokenizer.preprocess import PREPROCESS_MODES
from asvr.tokenizer.rvq.validation import ValidationReport, depth_metrics, plot_report


@dataclass(kw_only=True)
class ValidateOptions:
    tokenizer: str = field(metadata={"positional": True, "metavar": "TOK"})
    """Tokenizer directory."""
    images: list[str] = field(metadata={"metavar": "DIR"})
    """Image folders (recursive)."""
    max_images: int | None = None
    """Seeded random subset of the images."""
    preprocess: str | None = field(default=None, metadata={"choices": PREPROCESS_MODES})
    """Default: the tokenizer's mode."""
    encoding: EncodingOptions = field(default_factory=EncodingOptions, metadata={"prefix": ""})
    report: str = field(metadata={"metavar": "DIR"})
    """Output folder."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        ValidateOptions,
        groups={"encoding": "options"},
        help=help_,
        description="Encode images with the tokenizer's exact quantizer and report, per depth: relative reconstruction "
        "error, mean cosine similarity, utilisation (share of codes used), usage entropy/perplexity and dead codes. "
        "Writes report.json, error_cosine.png and usage.png.",
    ).set_defaults(func=run)


def run(args: ValidateOptions) -> int:
    enc = args.encoding
    set_threads(enc.threads)
    tok = SemanticTokenizer.load(args.tokenizer)
    try:
        paths = pick(list_images(args.images), args.max_images, enc.seed)
    except TrainingError as e:
        raise CLIError(str(e)) from None
    if not paths:
        raise CLIError(f"no images found under {' '.join(args.images)}")
    failures: list = []
    feats = [
        b.features.reshape(-1, tok.spec.dim)
        for b in iter_features(
            tok.encoder,
            paths,
            tok.preprocess_config(args.preprocess),
            batch_size=enc.batch_size,
            failures=failures,
            progress="validate",
        )
    ]
    if not feats:
        raise CLIError("no readable images")
    x = torch.cat(feats)
    codes = tok.quantizer.encode(x)  # the tokenizer's exact greedy encoder
    per_depth, usage = depth_metrics(x, codes, tok.quantizer)
    report = ValidationReport(
        n_images=len(paths) - len(failures),
        n_vectors=int(x.shape[0]),
        codebook_size=tok.spec.codebook_size,
        shared_codebook=tok.spec.shared_codebook,
        per_depth=per_depth,
        usage=usage,
        failures=[{"path": str(f.path), "stage": f.stage, "reason": f.reason} for f in failures],
    )
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    body = dict(report.to_dict(), tokenizer=str(args.tokenizer), fingerprint=tok.spec.fingerprint)
    atomic_write(out / "report.json", json.dumps(body, indent=1))
    plot_report(report, out, title=Path(args.tokenizer).name)
    if failures:
        print(
            f"skipped {len(failures)} unreadable images (first: {failures[0].path}: {failures[0].reason})",
            file=sys.stderr,
        )
    print(f"{'depth':>5} {'rel_err':>8} {'cosine':>7} {'used%':>6} {'ppl':>7} {'dead':>5}")
    for m in per_depth:
        print(
            f"{m.depth:>5} {m.rel_error:>8.4f} {m.cosine:>7.4f} {100 * m.utilisation:>6.1f} "
            f"{m.perplexity:>7.1f} {m.dead_codes:>5}"
        )
    print(f"report: {out / 'report.json'}")
    return 0
