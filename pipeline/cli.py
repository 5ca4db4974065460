"""``asvr-pipeline``: tokenize image corpora into code shards, inspect and verify them.

  asvr-pipeline tokenize INPUT... --tokenizer TOK --out OUT [options]
  asvr-pipeline inspect OUT
  asvr-pipeline verify OUT
  asvr-pipeline pack --codes CODES --data JSON... --model LLM --out DIR [options]

Every option is a field of the subcommand's config dataclass, written once
there (``tokenize``: ``asvr.pipeline.job.runner.PipelineConfig``, its
``sources`` the ``SourceOptions`` the readers take), so the CLI builds the
runner's config without copying options; ``--config FILE`` (.toml/.yaml/.json,
the field names as keys) gives any of them, flags win.

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

from dataclasses import dataclass, field

from asvr.core.cli_parser import OneLineParser
from asvr.core.config_cli import add_command, options_from_args, parse_dataclass_args
from asvr.core.errors import run_guarded


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


TOKENIZE_GROUPS = {"sources": "inputs", "Ray": "Ray (sizing and cluster)"}


@dataclass(kw_only=True)
class InspectOptions:
    out: str = field(metadata={"positional": True, "metavar": "OUT"})
    """Output directory of asvr-pipeline tokenize."""
    failures: int = 10
    """Failures to list."""


@dataclass(kw_only=True)
class VerifyOptions:
    out: str = field(metadata={"positional": True, "metavar": "OUT"})
    """Output directory of asvr-pipeline tokenize."""


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


def _run_tokenize(cfg) -> int:
    from asvr.pipeline.job.runner import run_pipeline

    with quiet_ray(cfg.verbose, joining=bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))):
        summary = run_pipeline(cfg)
    for line in summary.lines():
        print(line)
    print(f"wrote {cfg.out}")
    return 0


def _run_inspect(opts: InspectOptions) -> int:
    from asvr.pipeline.output.check import inspect_out

    rep = inspect_out(opts.out, opts.failures)
    print("\n".join(rep.lines))
    for p in rep.problems:
        print(f"problem: {p}", file=sys.stderr)
    return 0 if rep.ok else 1


def _run_verify(opts: VerifyOptions) -> int:
    from asvr.pipeline.output.check import verify_out

    rep = verify_out(opts.out)
    print("\n".join(rep.lines))
    for p in rep.problems:
        print(f"problem: {p}", file=sys.stderr)
    print("OK" if rep.ok else f"{len(rep.problems)} problem(s)")
    return 0 if rep.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """Each subcommand's options are the fields of its config dataclass (``PipelineConfig`` for tokenize)."""
    from asvr.core.help_text import plain
    from asvr.pipeline.job.runner import PipelineConfig

    p = OneLineParser(prog="asvr-pipeline", description=plain(__doc__.splitlines()[0]))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_command(
        sub,
        "tokenize",
        PipelineConfig,
        groups=TOKENIZE_GROUPS,
        help="encode image corpora into code shards (Ray Data)",
        description="Encode image corpora into code shards (Ray Data).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).set_defaults(func=_run_tokenize)
    add_command(
        sub, "inspect", InspectOptions, help="print the manifest, counts and first failures of OUT"
    ).set_defaults(func=_run_inspect)
    add_command(
        sub, "verify", VerifyOptions, help="re-hash shards against the manifest, check codes and counts"
    ).set_defaults(func=_run_verify)
    from asvr.pipeline.job.pack import PackConfig, run_cli  # issue 25

    add_command(
        sub,
        "pack",
        PackConfig,
        help="join conversations with code shards, tokenize and pack them into training rows (Ray)",
        description="Join LLaVA conversations with code shards by key, render the template, tokenize, compute "
        "labels and pack samples into rows of --max-len tokens, written as packed shards that asvr-train "
        "--packed streams. Rerun the same command after a crash or kill to resume.",
    ).set_defaults(func=run_cli)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def run() -> int:  # parsed inside the guard: a bad --config file is one line too
        args = parse_dataclass_args(build_parser(), None, argv)
        return args.func(options_from_args(args))

    return run_guarded(
        "asvr-pipeline",
        argv[0] if argv and argv[0] in ("tokenize", "inspect", "verify", "pack") else None,
        run,
        (FileNotFoundError, NotADirectoryError),
        interrupted="interrupted; rerun the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
