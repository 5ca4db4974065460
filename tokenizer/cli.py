"""``asvr-tokenizer``: train, validate, import, encode, index, search and inspect.

Each subcommand lives in its own module exposing ``register(subparsers)``; the
module is imported only when its command runs, so ``asvr-tokenizer encode``
never imports faiss or matplotlib.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from asvr.core.cli_parser import OneLineParser
from asvr.core.errors import run_guarded

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("asvr.tokenizer.commands.train", "train RVQ codebooks on a folder of images (faiss)"),
    "validate": (
        "asvr.tokenizer.commands.validate",
        "reconstruction error, utilisation and usage per depth, with plots",
    ),
    "encode": ("asvr.tokenizer.commands.encode", "print the codes of a few images"),
    "import-dualtoken": (
        "asvr.tokenizer.commands.import_dualtoken",
        "convert the published ASVR/DualToken tokenizer checkpoint",
    ),
    "index": ("asvr.tokenizer.commands.index", "build or extend a faiss index over code shards"),
    "search": ("asvr.tokenizer.commands.search", "nearest images of an image or a key in an index"),
    "inspect": (
        "asvr.tokenizer.commands.inspect_codes",
        "codebook usage, dead/dominant codes, nearest codes, code contact sheets",
    ),
}


def add_encoding_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that run the encoder over a folder of images (train, validate)."""
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="images per encoder call (EfficientNet-Lite0 on CPU: 64 ms/img at 8, 112 at 32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and faiss (default: theirs). On a busy 2-core machine 1 thread "
        "was 4x faster than 2 for EfficientNet (OpenMP spin-waits)",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from asvr.core.help_text import plain

    p = OneLineParser(prog="asvr-tokenizer", description=plain(__doc__.splitlines()[0]))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (mod, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_, add_help=False)
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.register(sub.add_parser(name, help=help_, description=help_))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only=command).parse_args(argv)
    from asvr.tokenizer.encoders.base import EncoderLoadError
    from asvr.core.errors import TokenizerError
    from asvr.tokenizer.preprocess import ImageError
    from asvr.core.shards import ShardError

    return run_guarded(
        "asvr-tokenizer",
        args.command,
        lambda: args.func(args),
        (TokenizerError, EncoderLoadError, ImageError, ShardError, FileNotFoundError),
    )


if __name__ == "__main__":
    sys.exit(main())
