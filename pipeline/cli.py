"""``asvr-pipeline``: tokenize image corpora into code shards, inspect and verify them.

  asvr-pipeline tokenize INPUT... --tokenizer TOK --out OUT [options]
  asvr-pipeline inspect OUT
  asvr-pipeline verify OUT
  asvr-pipeline pack --codes CODES --data JSON... --model LLM --out DIR [options]

``main(argv)`` takes an argument list, so tests run the real job in-process.
Bad input (missing INPUT, unknown format, bad tokenizer directory, a foreign
OUT) is a one-line error with exit code 2; ``verify``/``inspect`` exit 1 when
they find problems.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator

from asvr.core.cli_parser import OneLineParser
from asvr.core.errors import CLIError, TokenizerError, run_guarded
from asvr.tokenizer.preprocess import DEFAULT_MAX_PIXELS

from asvr.pipeline.inputs.sources import DEFAULT_MAX_READ_BYTES
from asvr.tokenizer.rvq.quantizer import SEARCH_DTYPES


def _epilog() -> str:
    from asvr.pipeline.inputs.sources import input_formats

    lines = ["Inputs (auto-detected per INPUT, or --input-format for all):"]
    lines += [f"  {f.name:<12} {f.help}" for f in input_formats().values()]
    return (
        "\n".join(lines)
        + """

Every input is a shard row or a row of OUT/failures.parquet (stage read, decode, preprocess, input,
duplicate); files and tar members that are not images are listed there too, at stage 'ignored'.
--format webdataset writes NNNNN_RRRRRR.codes.npy + NNNNN_RRRRRR.json members (the key is in the JSON).
Rerun the same command after a crash, kill or full disk: finished shards are kept, the rest is done.
Without --ray-address/RAY_ADDRESS a fresh local Ray is started (never another job's cluster).
"""
    )


def _tokenize_parser(sub) -> None:
    from asvr.pipeline.inputs.sources import input_formats

    p = sub.add_parser(
        "tokenize",
        help="encode image corpora into code shards (Ray Data)",
        description="Encode image corpora into code shards (Ray Data).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image folder, .tar (brace pattern), .parquet, LLaVA .json, Hugging Face datasets folder",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer artifact directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format", default="parquet", choices=["parquet", "webdataset"], help="shard format (default parquet)"
    )
    p.add_argument(
        "--preprocess",
        choices=["square", "pad"],
        default=None,
        help="resize to square, or pad to square with the mean colour first (default: the tokenizer's)",
    )
    p.add_argument(
        "--input-format",
        default="auto",
        choices=["auto", *input_formats()],
        help="format of every INPUT (default: detect each)",
    )
    p.add_argument("--image-root", help="folder that LLaVA JSON image paths are relative to")
    p.add_argument("--image-column", help="Parquet column holding image bytes")
    p.add_argument("--key-column", help="Parquet column holding the key")
    p.add_argument("--caption-column", help="Parquet column holding a caption")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode call (default 32)")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="input images per shard; also the unit of resume (default 1000)"
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="JPEG draft decoding: ~2x faster on large photos, but pixels and so codes differ",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"larger images fail as decompression bombs (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--max-read-mb",
        type=float,
        default=DEFAULT_MAX_READ_BYTES / 2**20,
        help="an image file, tar member or Parquet row group (image column, uncompressed) larger than this "
        f"fails before it is read (default {DEFAULT_MAX_READ_BYTES // 2**20}: half a decode task's memory)",
    )
    p.add_argument(
        "--encoder-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="encoder precision (bfloat16 autocast is faster on GPUs; features change)",
    )
    p.add_argument(
        "--search-dtype",
        default=None,
        choices=list(SEARCH_DTYPES),
        help="RVQ candidate search precision; codes are identical for all, only speed moves "
        "(default: fused-bf16x3 on a GPU with triton installed, else float32; fused-* need triton)",
    )
    p.add_argument(
        "--compile-encoder",
        action="store_true",
        help="torch.compile the encoder once per actor (one batch shape; pays off on long GPU jobs)",
    )
    p.add_argument(
        "--encode-chunks",
        type=int,
        default=1,
        help="pieces per batch: on a GPU the encoder runs the next piece while the RVQ quantizes this one",
    )
    p.add_argument("--encode-actors", type=int, default=0, help="encode actors (default: one per GPU, or 1 per 8 CPUs)")
    p.add_argument("--encode-threads", type=int, default=0, help="torch threads per CPU actor (default: CPUs/actors)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (or set RAY_ADDRESS; the workers write the shards, so INPUTs and --out "
        "must be at the same path on every node); default: start a fresh local Ray",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an OUT written with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own warnings and log lines")
    p.set_defaults(func=_run_tokenize)


@contextlib.contextmanager
def quiet_ray(verbose: bool, joining: bool) -> Iterator[None]:
    """Ray's documented environment knobs, set around the job (what they hide was
    measured on a local 2-CPU run of Ray 2.60.0), and restored after it so that a
    caller in the same process (a test, a notebook) starts its next Ray unchanged:

    * ``RAY_AUTH_MODE=token``: a new local cluster turns token authentication on by
      default and warns that it did; naming the mode keeps that (secure) default without
      the warning.  Not set when joining a cluster (its mode is the cluster's).

    ``--verbose`` leaves it unset; a value already in the environment is kept.  (Ray's
    ``RAY_BACKEND_LOG_LEVEL`` would hide the driver's error-level ``core_worker.cc`` line
    too, but announces itself with a line of its own; see ``runner._execute`` instead.)"""
    if verbose or joining or "RAY_AUTH_MODE" in os.environ:
        yield
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)


def _run_tokenize(args) -> int:
    from asvr.pipeline.job.runner import PipelineConfig, run_pipeline
    from asvr.pipeline.inputs.sources import SourceOptions

    try:
        cfg = _config(args, PipelineConfig, SourceOptions)
    except ValueError as e:  # a bad combination of options, named by __post_init__
        raise CLIError(str(e)) from None
    with quiet_ray(args.verbose, joining=bool(args.ray_address or os.environ.get("RAY_ADDRESS"))):
        summary = run_pipeline(cfg)
    for line in summary.lines():
        print(line)
    print(f"wrote {args.out}")
    return 0


def _config(args, PipelineConfig, SourceOptions):
    return PipelineConfig(
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        out=args.out,
        sources=SourceOptions(
            input_format=args.input_format,
            image_root=args.image_root,
            image_column=args.image_column,
            key_column=args.key_column,
            caption_column=args.caption_column,
            max_read_bytes=int(args.max_read_mb * 2**20),
        ),
        format=args.format,
        preprocess=args.preprocess,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        fast_decode=args.fast_decode,
        max_pixels=args.max_pixels,
        encoder_dtype=args.encoder_dtype,
        search_dtype=args.search_dtype,
        compile_encoder=args.compile_encoder,
        encode_chunks=args.encode_chunks,
        encode_actors=args.encode_actors,
        encode_threads=args.encode_threads,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        verbose=args.verbose,
    )


def _run_inspect(args) -> int:
    from asvr.pipeline.output.check import inspect_out

    rep = inspect_out(args.out, args.failures)
    print("\n".join(rep.lines))
    for p in rep.problems:
        print(f"problem: {p}", file=sys.stderr)
    return 0 if rep.ok else 1


def _run_verify(args) -> int:
    from asvr.pipeline.output.check import verify_out

    rep = verify_out(args.out)
    print("\n".join(rep.lines))
    for p in rep.problems:
        print(f"problem: {p}", file=sys.stderr)
    print("OK" if rep.ok else f"{len(rep.problems)} problem(s)")
    return 0 if rep.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from asvr.core.help_text import plain

    p = OneLineParser(prog="asvr-pipeline", description=plain(__doc__.splitlines()[0]))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _tokenize_parser(sub)
    pi = sub.add_parser("inspect", help="print the manifest, counts and first failures of OUT")
    pi.add_argument("out", metavar="OUT")
    pi.add_argument("--failures", type=int, default=10, help="failures to list (default 10)")
    pi.set_defaults(func=_run_inspect)
    pv = sub.add_parser("verify", help="re-hash shards against the manifest, check codes and counts")
    pv.add_argument("out", metavar="OUT")
    pv.set_defaults(func=_run_verify)
    from asvr.pipeline.job.pack import add_parser as add_pack_parser

    add_pack_parser(sub)  # issue 25: asvr-pipeline pack
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from asvr.tokenizer.encoders.base import EncoderLoadError
    from asvr.core.shards import ShardError

    from asvr.pipeline.inputs.sources import SourceError
    from asvr.pipeline.output.writer import OutputError

    return run_guarded(
        "asvr-pipeline",
        args.command,
        lambda: args.func(args),
        (SourceError, OutputError, ShardError, TokenizerError, EncoderLoadError, FileNotFoundError, NotADirectoryError),
        interrupted="interrupted; rerun the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
