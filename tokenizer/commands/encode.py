"""``asvr-tokenizer encode``: print the codes of a few images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from asvr.core.config_cli import add_command
from asvr.core.errors import CLIError
from asvr.tokenizer.model import SemanticTokenizer
from asvr.tokenizer.preprocess import PREPROCESS_MODES, ImageError, open_image, preprocess, read_file


@dataclass(kw_only=True)
class EncodeOptions:
    tokenizer: str = field(metadata={"positional": True, "metavar": "TOK"})
    """Tokenizer directory."""
    images: list[str] = field(metadata={"positional": True, "metavar": "IMAGE"})
    """Image files."""
    json: bool = False
    """One JSON object per line per image."""
    preprocess: str | None = field(default=None, metadata={"choices": PREPROCESS_MODES})
    """Default: the tokenizer's mode."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        EncodeOptions,
        help=help_,
        description="Print the codes of each image: one line per grid row, each cell the D codes joined by ':' "
        "(or one JSON object per image with --json: codes nested [H][W][D]). An unreadable image "
        "stops with a one-line error naming it (exit 2).",
    ).set_defaults(func=run)


def run(args: EncodeOptions) -> int:
    tok = SemanticTokenizer.load(args.tokenizer)
    cfg = tok.preprocess_config(args.preprocess)
    pixels = []
    for path in args.images:  # decode everything first: a bad file fails before any output
        try:
            img = open_image(read_file(path), cfg)
            pixels.append(preprocess(img, cfg))
        except ImageError as e:
            raise CLIError(f"{path}: {e.reason}") from None
    codes = tok.encode_pixels(np.stack(pixels)).cpu().numpy()
    h, w, d = codes.shape[1:]
    for path, c in zip(args.images, codes):
        if args.json:
            print(json.dumps({"image": path, "grid": [h, w], "depth": d, "preprocess": cfg.mode, "codes": c.tolist()}))
        else:
            print(f"# {path}  grid {h}x{w}  depth {d}  preprocess {cfg.mode}")
            for row in c:
                print(" ".join(":".join(str(int(v)) for v in cell) for cell in row))
    return 0
