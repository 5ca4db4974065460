"""``asvr-tokenizer index CODES --tokenizer TOK --out IDX``: a faiss index over code shards.

One vector per image (mean of the dequantized patch features, L2-normalised;
see :mod:`asvr.tokenizer.codes.retrieval` for why), exact ``Flat`` below 100k images,
``IVF{4 sqrt N},PQ{C/8},Refine(SQ8)`` above (recall@10 0.98 at 24-32x the exact
queries/s on 100k vectors).  ``--add`` indexes
only the shards the index lacks (by file name and sha256).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from asvr.core.config_cli import add_command
from asvr.core.errors import CLIError
from asvr.core.help_text import plain


@dataclass(kw_only=True)
class IndexOptions:
    codes: str = field(metadata={"positional": True, "metavar": "CODES"})
    """Code shard directory written by `asvr-pipeline tokenize` (or one shard file)."""
    tokenizer: str | None = field(default=None, metadata={"metavar": "TOK"})
    """Tokenizer directory the shards were made with (required for a new index; --add defaults to the one
    recorded in IDX/index.json)."""
    out: str = field(metadata={"metavar": "IDX"})
    """Index directory (index.json, index.*.faiss, keys.*.parquet)."""
    factory: str | None = field(default=None, metadata={"metavar": "STR"})
    """faiss index_factory string overriding the size-based choice, e.g. Flat, HNSW32,Flat, IVF1024,PQ40,Refine(SQ8)
    (inner-product metric)."""
    search_params: str | None = field(default=None, metadata={"metavar": "P"})
    """Stored search parameters, e.g. nprobe=32,efSearch=128,k_factor=4."""
    add: bool = field(default=False, metadata={"exclusive": "mode"})
    """Add the shards of CODES that IDX does not hold yet."""
    force: bool = field(default=False, metadata={"exclusive": "mode"})
    """Rebuild IDX from scratch if it exists."""
    quiet: bool = False
    """No progress bar."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        IndexOptions,
        help=help_,
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).set_defaults(func=run)


def run(args: IndexOptions) -> int:
    from tqdm import tqdm

    from asvr.tokenizer.codes.retrieval import EXACT_LIMIT, RetrievalError, build_index, parse_search_params

    def progress(total_rows: int):
        return tqdm(total=total_rows, unit="img", desc="index", disable=args.quiet)

    try:
        res = build_index(
            args.codes,
            args.out,
            args.tokenizer,
            factory=args.factory,
            search_params=parse_search_params(args.search_params),
            add=args.add,
            force=args.force,
            progress=progress,
        )
    except RetrievalError as e:
        raise CLIError(str(e)) from None
    m = res.meta
    if m.factory == "Flat" and m.count >= EXACT_LIMIT:
        print(
            f"note: {m.count} images in an exact Flat index; `--force` rebuilds it with the approximate index "
            f"chosen for this size",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "index": str(args.out),
                "factory": m.factory,
                "count": m.count,
                "dim": m.dim,
                "added_shards": len(res.added_shards),
                "skipped_shards": len(res.skipped_shards),
                "added_images": res.added_rows,
                "search_params": m.search_params,
            }
        )
    )
    return 0
