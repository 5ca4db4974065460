"""``asvr-tokenizer``: train, validate, import, encode, index, search and inspect.

Each subcommand lives in its own module exposing ``register(subparsers, name,
help)``, an options dataclass (every option one field, ``asvr.core.config_cli``;
the encoding options of train and validate are the shared
:class:`EncodingOptions` component) and ``run(options)``; the module is
imported only when its command runs, so ``asvr-tokenizer encode`` never
imports faiss or matplotlib.  Every subcommand reads ``--config FILE``
(.toml/.yaml/.json, the field names as keys; flags win), except that
``import-dualtoken``'s is ``--config-file``: its ``--config`` is the DualToken
config folder.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from asvr.core.cli_parser import OneLineParser
from asvr.core.config_cli import options_from_args, parse_dataclass_args
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


@dataclass(kw_only=True)
class EncodingOptions:
    """How the commands that run the encoder over a folder of images (train, validate) run it."""

    batch_size: int = 8
    """Images per encoder call (EfficientNet-Lite0 on CPU: 64 ms/img at 8, 112 at 32)."""
    seed: int = 0
    """Seeds the random image and vector subsets (and the codebook training)."""
    threads: int | None = None
    """CPU threads for torch and faiss (default: theirs). On a busy 2-core machine 1 thread was 4x faster than 2
    for EfficientNet (OpenMP spin-waits)."""


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
        module.register(sub, name, help_)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None

    def run() -> int:  # parsed inside the guard: a bad --config file is one line too
        args = parse_dataclass_args(build_parser(only=command), None, argv)
        return args.func(options_from_args(args))

    return run_guarded("asvr-tokenizer", command, run, (FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
