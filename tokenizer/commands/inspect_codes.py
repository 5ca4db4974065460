"""``asvr-tokenizer inspect TOK``: what the codebook learned.

* ``--codes CODES``: usage per depth over the shards (``usage.png``: counts by
  rank, log scale), dead codes (never used) and dominant codes (used more
  than ``--dominant-factor`` x the uniform share), perplexity per depth.
* ``--nearest d:k``: the codes nearest to code k in depth d's codebook
  (squared L2, faiss IndexFlatL2).
* ``--code d:k`` (needs ``--codes``): the images and patches using the code;
  with ``--images ROOT`` a contact sheet ``code_d_k.png`` with the patches
  outlined on the original images (the padding of ``pad`` mode is accounted for).

Depths are numbered from 0 (``0:17`` is code 17 of the first depth), as in
every asvr command.  Without options it prints the summary: encoder, grid,
depth x codebook size, fingerprint and the mean code norm per depth.
``--report DIR`` writes report.json and the PNGs; the summary is printed
either way.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asvr.core.atomic import atomic_write
from asvr.core.config_cli import add_command
from asvr.core.errors import CLIError
from asvr.core.help_text import plain


@dataclass(kw_only=True)
class InspectOptions:
    tokenizer: str = field(metadata={"positional": True, "metavar": "TOK"})
    """Tokenizer directory."""
    codes: str | None = field(default=None, metadata={"metavar": "CODES"})
    """Code shard directory made with this tokenizer (for usage and --code)."""
    images: str | None = field(default=None, metadata={"metavar": "ROOT"})
    """Image root the shard keys are relative to (for the --code sheet)."""
    report: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Write report.json, usage.png and code sheets here."""
    code: list[str] = field(default_factory=list, metadata={"metavar": "D:K", "append": True})
    """Images/patches using code K at depth D (both from 0); D:top = the most used code of depth D (repeatable)."""
    nearest: list[str] = field(default_factory=list, metadata={"metavar": "D:K", "append": True})
    """Nearest codes of code K at depth D, or D:top (repeatable)."""
    top: int = 8
    """Nearest codes to list."""
    max_images: int = 16
    """Images on a code sheet."""
    dominant_factor: float = 10.0
    """Dominant: share > F / K."""
    quiet: bool = False
    """No progress bar."""


def register(sub, name: str, help_: str) -> None:
    add_command(
        sub,
        name,
        InspectOptions,
        help=help_,
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).set_defaults(func=run)


def _code(text: str, depth: int, k: int) -> tuple[int, int]:
    """``D:K``, or ``D:top`` (the most used code at depth D; resolved once usage is known, as K = -1)."""
    ds, sep, cs = text.partition(":")
    try:
        d, c = int(ds), (-1 if cs == "top" else int(cs))
    except ValueError:
        raise CLIError(f"code {text!r} must be DEPTH:CODE or DEPTH:top, e.g. 0:17") from None
    if not sep or not (0 <= d < depth and -1 <= c < k):
        raise CLIError(f"code {text!r} out of range: depth 0..{depth - 1}, code 0..{k - 1}")
    return d, c


def run(args: InspectOptions) -> int:
    from asvr.tokenizer.artifact import load_artifact
    from asvr.tokenizer.codes.inspection import InspectError

    spec, cb = load_artifact(args.tokenizer)
    codes, nearest = _requested_codes(args, spec.depth, spec.codebook_size)
    report_dir = Path(args.report) if args.report else None
    if report_dir:
        report_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "tokenizer": str(Path(args.tokenizer).resolve()),
        "fingerprint": spec.fingerprint,
        "depth": spec.depth,
        "codebook_size": spec.codebook_size,
        "dim": spec.dim,
        "grid": list(spec.grid),
        "shared_codebook": spec.shared_codebook,
    }
    for line in summary_lines(args.tokenizer, spec, cb):
        print(line)
    if not (args.codes or nearest or report_dir):
        print("more: --codes CODES (usage per depth), --nearest D:K, --code D:K, --report DIR")
    try:
        if args.codes:
            usage = _usage(args, spec, report, report_dir)
            top = lambda d, c: (d, int(usage.counts[d].argmax()) if c < 0 else c)  # noqa: E731
            codes, nearest = [top(*x) for x in codes], [top(*x) for x in nearest]
        report["nearest"] = [_nearest(args, cb, d, k) for d, k in nearest]
        report["codes"] = [_code_uses(args, spec, d, k, report_dir) for d, k in codes]
    except InspectError as e:
        raise CLIError(str(e)) from None
    if report_dir:
        _write_json(report_dir / "report.json", report)
        print(f"report: {report_dir / 'report.json'}")
    return 0


def _requested_codes(args: InspectOptions, depth: int, k: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``--code`` and ``--nearest`` parsed (``D:top`` as K = -1) and checked against the other options."""
    codes = [_code(t, depth, k) for t in args.code]
    nearest = [_code(t, depth, k) for t in args.nearest]
    if (codes or any(c < 0 for _, c in nearest)) and not args.codes:
        raise CLIError("--code and D:top need --codes CODES (the shards to look in)")
    if args.top < 1 or args.max_images < 1:
        raise CLIError("--top and --max-images must be >= 1")
    return codes, nearest


def _bar(args: InspectOptions, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc=desc, disable=args.quiet)


def _usage(args: InspectOptions, spec, report: dict, report_dir: Path | None):
    """Usage per depth over ``--codes``: printed, in ``report["usage"]`` and (with a report) ``usage.png``."""
    from asvr.tokenizer.codes.inspection import plot_usage, summarize, usage_counts

    assert args.codes is not None
    K = spec.codebook_size
    usage = usage_counts(args.codes, spec.fingerprint, spec.depth, K, lambda n: _bar(args, n, "usage"))
    summ = summarize(usage, args.dominant_factor)
    report["usage"] = {
        "codes": str(Path(args.codes).resolve()),
        "images": usage.images,
        "patches": usage.patches,
        "preprocess": usage.preprocess,
        "expected_per_code": usage.patches / K,
        "dominant_factor": args.dominant_factor,
        "depths": [asdict(s) for s in summ],
        "counts": usage.counts.tolist(),
    }
    for s in summ:
        print(
            f"depth {s.depth}: used {s.used}/{K}  dead {s.dead}  dominant {len(s.dominant)}  "
            f"perplexity {s.perplexity:.1f}  top-1% share {s.top_share:.3f}"
        )
    if report_dir:
        plot_usage(usage, report_dir / "usage.png")
    return usage


def _nearest(args: InspectOptions, cb, d: int, k: int) -> dict:
    """``--nearest d:k``: printed; returns its report entry."""
    from asvr.tokenizer.codes.inspection import nearest_codes

    nn = nearest_codes(cb[0 if cb.shape[0] == 1 else d].numpy(), k, args.top)
    print(f"nearest {d}:{k}: " + ", ".join(f"{c} ({x:.3g})" for c, x in nn))
    return {"code": f"{d}:{k}", "neighbours": [{"code": c, "sq_l2": round(x, 6)} for c, x in nn]}


def _code_uses(args: InspectOptions, spec, d: int, k: int, report_dir: Path | None) -> dict:
    """``--code d:k``: where it is used (a contact sheet with ``--report`` and ``--images``), printed;
    returns its report entry."""
    from asvr.tokenizer.codes.inspection import code_sheet, find_code_uses

    assert args.codes is not None  # --code needs --codes (refused above)
    uses = find_code_uses(
        args.codes, spec.fingerprint, d, k, args.max_images, functools.partial(_bar, args, desc=f"code {d}:{k}")
    )
    entry = {
        "code": f"{d}:{k}",
        "images": uses.images,
        "patches": uses.patches,
        "preprocess": uses.preprocess,
        "top": [{"key": u.key, "positions": [list(p) for p in u.positions]} for u in uses.top],
    }
    msg = f"code {d}:{k}: {uses.patches} patches in {uses.images} images"
    if report_dir and args.images:
        path, missing = code_sheet(uses, args.images, (spec.grid[0], spec.grid[1]), report_dir / f"code_{d}_{k}.png")
        entry["sheet"] = path.name
        msg += f"; sheet {path}" + (f" ({missing} images not found under {args.images})" if missing else "")
    print(msg)
    return entry


def summary_lines(path: str, spec, cb) -> list[str]:
    """What the tokenizer is, in a few lines (``cb``: float32 codebooks ``[D or 1, K, C]``)."""
    e = spec.encoder
    norms = cb.norm(dim=-1).mean(dim=-1).tolist()
    shared = ", shared codebook" if spec.shared_codebook else ""
    lines = [
        f"{path}: {e.kind} at {e.image_size} px ({spec.preprocess}), grid "
        f"{spec.grid[0]}x{spec.grid[1]}, dim {spec.dim}, {spec.depth} depths x {spec.codebook_size} codes{shared}",
        f"fingerprint {spec.fingerprint}",
    ]
    names = ["all depths"] if spec.shared_codebook else [f"depth {d}" for d in range(len(norms))]
    lines += [f"{n}: mean code norm {v:.4g}" for n, v in zip(names, norms)]
    return lines


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj))
