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
from pathlib import Path

from asvr.core.errors import CLIError
from asvr.core.help_text import plain


def register(p: argparse.ArgumentParser) -> None:
    p.description = plain(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("index", metavar="IDX", help="index directory built by `asvr-tokenizer index`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", metavar="FILE", help="query image file (encoded with the tokenizer)")
    q.add_argument("--key", metavar="KEY", help="query by the key of an indexed image")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--tokenizer", metavar="TOK", help="tokenizer directory (default: the one in IDX/index.json)")
    p.add_argument(
        "--search-params", metavar="P", help="override stored search parameters, e.g. nprobe=64,efSearch=256"
    )
    p.add_argument("--images", metavar="ROOT", help="image root the keys are relative to (for --sheet)")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet of the query and neighbours (needs --images)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
