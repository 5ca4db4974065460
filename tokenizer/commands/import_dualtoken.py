"""``asvr-tokenizer import-dualtoken``: convert the published ASVR/DualToken
semantic tokenizer (config folder + checkpoint + SigLIP config) into a
self-contained tokenizer directory.  See :mod:`.dualtoken`."""

from __future__ import annotations

import argparse
import sys

from asvr.tokenizer.artifact import refuse_existing
from asvr.core.errors import CLIError
from asvr.tokenizer.dualtoken import DualTokenImportError, import_dualtoken
from asvr.tokenizer.model import SemanticTokenizer
from asvr.tokenizer.preprocess import PREPROCESS_MODES


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Convert a DualToken/ASVR RQ-VAE-SigLIP checkpoint: the SigLIP vision tower up to the second to last "
        "layer and the semantic RVQ codebooks (pad row dropped) become TOK/encoder/ and codebooks.safetensors. "
        "Keys are checked strictly; unneeded parts (pixel quantizer, decoder, text tower) are listed and skipped."
    )
    p.add_argument(
        "--config", required=True, metavar="DIR", help="DualToken config folder (config.json with rqvaesiglip)"
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE.pt", help="checkpoint {'state_dict': ...}")
    p.add_argument(
        "--siglip", required=True, metavar="DIR", help="SigLIP folder: config.json (+ preprocessor_config.json)"
    )
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="square",
        help="mode recorded in the artifact (reference: square for pretraining, pad for instruction tuning)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip loading the written tokenizer back")
    p.add_argument("--out", required=True, metavar="TOK", help="tokenizer directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_existing(args.out, args.overwrite)
    try:
        res = import_dualtoken(args.config, args.checkpoint, args.siglip, args.out, preprocess=args.preprocess)
    except DualTokenImportError as e:
        raise CLIError(str(e)) from None
    s = res.spec
    if res.skipped:
        parts = ", ".join(f"{p} ({n})" for p, n in res.skipped.items())
        print(f"skipped {sum(res.skipped.values())} unneeded tensors: {parts}", file=sys.stderr)
    if not args.no_verify:
        SemanticTokenizer.load(args.out)  # strict: proves the artifact loads as written
    print(
        f"wrote {args.out}: siglip layer {s.encoder.feature_layer} ({res.vision_tensors} vision tensors), "
        f"grid {s.grid[0]}x{s.grid[1]}, C={s.dim}, D={s.depth}, K={s.codebook_size}, "
        f"{'shared' if s.shared_codebook else 'per-depth'} codebooks, fingerprint {s.fingerprint[:12]}"
    )
    return 0
