"""``asvr-tokenizer search IDX (--image FILE | --key KEY)``: nearest images in an index.

``--image`` encodes the file with the index's tokenizer (the path recorded in
IDX/index.json unless ``--tokenizer`` is given; its fingerprint must match) in
the index's preprocess mode, so an image of the corpus finds itself first at
cosine 1.  ``--key`` uses the stored image's vector.  ``--sheet`` draws the
query and its neighbours (key + score) from the files under ``--images``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from asvr.core.config_cli import add_command
from asvr.core.errors import CLIError
from asvr.core.help_text import plain


@dataclass(kw_only=True)
class SearchOptions:
    index: str = field(metadata={"positional": True, "metavar": "IDX"})
    """Index directory built by `asvr-tokenizer index`."""
    image: str | None = field(
        default=None, metadata={"metavar": "FILE", "exclusive": "query", "exclusive_required": True}
    )
    """Query image file (encoded with the tokenizer)."""
    key: str | None = field(default=None, metadata={"metavar": "KEY", "exclusive": "query"})
    """Query by the key of an indexed image."""
    k: int = field(default=10, metadata={"flag": "-k"})
    """Neighbours to return."""
    json: bool = False
    """Print one JSON object instead of a table."""
    tokenizer: str | None = field(default=None, metadata={"metavar": "TOK"})
    """Tokenizer directory (default: the one in IDX/index.json)."""
    search_params: str | None = field(default=None, metadata={"metavar": "P"})
    """Override stored search parameters, e.g. nprobe=64,efSearch=256."""
    images: str | None = field(default=None, metadata={"metavar": "ROOT"})
    """Image root the keys are relative to (for --sheet)."""
    sheet: str | None = field(default=None, metadata={"metavar": "PNG"})
    """Write a contact sheet of the query and neighbours (needs --images)."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        SearchOptions,
        help=help_,
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).set_defaults(func=run)


def run(args: SearchOptions) -> int:
    from asvr.tokenizer.codes.retrieval import ImageIndex, RetrievalError, parse_search_params

    if args.k < 1:
        raise CLIError(f"-k must be >= 1, got {args.k}")
    if args.sheet and not args.images:
        raise CLIError("--sheet needs --images ROOT (the folder the keys are relative to)")
    try:
        idx = ImageIndex(args.index, parse_search_params(args.search_params))
        if args.key is not None:
            query = idx.vector_of_key(args.key, args.tokenizer)
        else:
            from asvr.tokenizer.model import SemanticTokenizer

            assert args.image is not None  # --image or --key: one is required
            if not Path(args.image).is_file():
                raise CLIError(f"{args.image}: no such image file")
            tok = SemanticTokenizer.load(args.tokenizer or idx.meta.tokenizer)
            query = idx.vector_of_images([args.image], tok)
        hits = idx.search(query, args.k)[0]
    except RetrievalError as e:
        raise CLIError(str(e)) from None

    what = {"key": args.key} if args.key is not None else {"image": args.image}
    if args.json:
        print(
            json.dumps(
                {
                    "query": what,
                    "index": str(args.index),
                    "factory": idx.meta.factory,
                    "neighbours": [
                        {"rank": r + 1, "key": h.key, "score": round(h.score, 6)} for r, h in enumerate(hits)
                    ],
                }
            )
        )
    else:
        print(f"query {next(iter(what.values()))}  ({idx.meta.factory}, {len(idx)} images)")
        for r, h in enumerate(hits):
            print(f"{r + 1:3d}  {h.score:8.4f}  {h.key}")
    if args.sheet:
        _sheet(args, hits)
    return 0


def _sheet(args, hits) -> None:
    from asvr.tokenizer.preprocess import open_image, read_file
    from asvr.tokenizer.codes.sheets import SheetLayout, Tile, draw_sheet, load_image_under, save_png

    if args.image is not None:
        q = Tile(open_image(read_file(args.image)), f"query\n{Path(args.image).name}", highlight=True)
    else:
        q = Tile(load_image_under(args.images, args.key), f"query\n{args.key}", highlight=True)
    tiles = [q] + [
        Tile(load_image_under(args.images, h.key), f"{r + 1}. {h.score:.3f}\n{h.key}") for r, h in enumerate(hits)
    ]
    missing = sum(t.image is None for t in tiles)
    save_png(
        draw_sheet(
            tiles,
            SheetLayout(cols=min(6, len(tiles))),
            title=f"search {args.index}: query + {len(hits)} nearest (cosine)",
        ),
        args.sheet,
    )
    print(f"sheet: {args.sheet}" + (f" ({missing} keys not found under {args.images})" if missing else ""))
