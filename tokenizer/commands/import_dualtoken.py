"""``asvr-tokenizer import-dualtoken``: convert the published ASVR/DualToken
semantic tokenizer (config folder + checkpoint + SigLIP config) into a
self-contained tokenizer directory.  See :mod:`.dualtoken`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from asvr.tokenizer.artifact import refuse_existing
from asvr.core.config_cli import add_command
from asvr.core.errors import CLIError
from asvr.tokenizer.dualtoken import DualTokenImportError, import_dualtoken
from asvr.tokenizer.model import SemanticTokenizer
from asvr.tokenizer.preprocess import PREPROCESS_MODES


@dataclass(kw_only=True)
class ImportOptions:
    config: str = field(metadata={"metavar": "DIR"})
    """DualToken config folder (config.json with rqvaesiglip)."""
    checkpoint: str = field(metadata={"metavar": "FILE.pt"})
    """Checkpoint {'state_dict': ...}."""
    siglip: str = field(metadata={"metavar": "DIR"})
    """SigLIP folder: config.json (+ preprocessor_config.json)."""
    preprocess: str = field(default="square", metadata={"choices": PREPROCESS_MODES})
    """Mode recorded in the artifact (reference: square for pretraining, pad for instruction tuning)."""
    verify: bool = field(default=True, metadata={"flag": "--no-verify"})
    """(--no-verify) skip loading the written tokenizer back."""
    out: str = field(metadata={"metavar": "TOK"})
    """Tokenizer directory to write."""
    overwrite: bool = False
    """Replace a tokenizer already in --out."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        ImportOptions,
        config_flag="--config-file",  # --config is the DualToken config folder
        help=help_,
        description="Convert a DualToken/ASVR RQ-VAE-SigLIP checkpoint: the SigLIP vision tower up to the second to "
        "last layer and the semantic RVQ codebooks (pad row dropped) become TOK/encoder/ and codebooks.safetensors. "
        "Keys are checked strictly; unneeded parts (pixel quantizer, decoder, text tower) are listed and skipped.",
    ).set_defaults(func=run)


def run(args: ImportOptions) -> int:
    refuse_existing(args.out, args.overwrite)
    try:
        res = import_dualtoken(args.config, args.checkpoint, args.siglip, args.out, preprocess=args.preprocess)
    except DualTokenImportError as e:
        raise CLIError(str(e)) from None
    s = res.spec
    if res.skipped:
        parts = ", ".join(f"{p} ({n})" for p, n in res.skipped.items())
        print(f"skipped {sum(res.skipped.values())} unneeded tensors: {parts}", file=sys.stderr)
    if args.verify:
        SemanticTokenizer.load(args.out)  # strict: proves the artifact loads as written
    print(
        f"wrote {args.out}: siglip layer {s.encoder.feature_layer} ({res.vision_tensors} vision tensors), "
        f"grid {s.grid[0]}x{s.grid[1]}, C={s.dim}, D={s.depth}, K={s.codebook_size}, "
        f"{'shared' if s.shared_codebook else 'per-depth'} codebooks, fingerprint {s.fingerprint[:12]}"
    )
    return 0
