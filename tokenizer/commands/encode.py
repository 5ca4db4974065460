"""``asvr-tokenizer encode``: print the codes of a few images."""

from __future__ import annotations

import argparse
import json

import numpy as np

from asvr.core.errors import CLIError
from asvr.tokenizer.model import SemanticTokenizer
from asvr.tokenizer.preprocess import PREPROCESS_MODES, ImageError, open_image, preprocess, read_file


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print the codes of each image: one line per grid row, each cell the D codes joined by ':' "
        "(or one JSON object per image with --json: codes nested [H][W][D]). An unreadable image "
        "stops with a one-line error naming it (exit 2)."
    )
    p.add_argument("tokenizer", metavar="TOK", help="tokenizer directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="one JSON object per line per image")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default=None, help="default: the tokenizer's mode")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
