"""``asvr-train``: train the ASVR LVLM on cached code shards with DeepSpeed.

Examples::

    # pretraining (projector + visual head; the LLM is frozen), one process
    asvr-train --model llm/ --tokenizer tok/ --codes codes/ --data llava_pretrain.json \\
        --stage pretrain --vision-input codes --output-dir runs/pt --max-steps 100
    # instruction tuning from that run, two processes, ZeRO-3, online vision input
    torchrun --nproc_per_node 2 -m asvr.train.cli --model llm/ --tokenizer tok/ --codes codes/ \\
        --data llava_sft.json --images images/ --stage sft --vision-input online \\
        --init-from runs/pt --zero 3 --output-dir runs/sft

The run folder gets ``checkpoints/`` (DeepSpeed tags + loader state + RNG;
``--resume auto`` continues from the newest), ``metrics.jsonl``, ``loss.png``,
``bad_samples.jsonl`` (when --skip-bad-samples dropped some), ``final/``
(the exported model, loaded with ``asvr.train.export.native.load_exported(RUN/final)``)
and ``train_config.json``, the resolved options: ``--config RUN/train_config.json``
(or any .toml/.yaml with the same keys) runs it again; flags override the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asvr.core.cli_parser import OneLineParser
from asvr.core.config_cli import add_config_argument, add_dataclass_arguments, options_from_args, parse_dataclass_args
from asvr.core.errors import CLIError, run_guarded
from asvr.core.help_text import plain

from asvr.train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """Every option is a ``TrainConfig`` field (``train/config.py``): its docstring is the help."""
    p = OneLineParser(
        prog="asvr-train", description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_argument(
        p,
        TrainConfig,
        help="options from a .toml/.yaml/.json file (field names as keys, [head] a table); flags given "
        "here win. RUN/train_config.json is one: --config RUN/train_config.json reproduces RUN",
    )
    add_dataclass_arguments(p, TrainConfig, groups={"head": "model: visual head"})
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    for name in ("model", "tokenizer", "codes", "packed"):
        if getattr(a, name) is not None and not Path(getattr(a, name)).exists():
            raise CLIError(f"--{name} {getattr(a, name)}: no such file or folder")
    for f in a.data:
        if not Path(f).is_file():
            raise CLIError(f"--data {f}: no such file")
    if a.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise CLIError("--tensorboard needs the tensorboard package (pip install tensorboard)")
    if a.vision_tower and not Path(a.vision_tower).is_dir():
        raise CLIError(f"--vision-tower {a.vision_tower}: no such folder")
    if a.images and not Path(a.images).is_dir():
        raise CLIError(f"--images {a.images}: no such folder")
    from asvr.train.model.vision_input import get_vision_input

    if get_vision_input(a.vision_input).model_runs_tower and not a.images:
        raise CLIError(f"--vision-input {a.vision_input} reads the images every step: pass --images (the image root)")
    return options_from_args(a)  # TrainConfig's own checks: one line each


def main(argv: list[str] | None = None) -> int:
    from asvr.train.loop.preemption import Preempted

    parsed: list[argparse.Namespace] = []

    def run() -> int:
        parsed.append(parse_dataclass_args(build_parser(), TrainConfig, argv))
        try:
            return _train(parsed[0])
        except Preempted as p:  # SIGTERM/SIGUSR1: saved on the way out (preemption.py), 128 + signum
            print(f"asvr-train: {p.message(parsed[0].output_dir, _newest(parsed[0].output_dir))}", file=sys.stderr)
            return p.exit_code

    def interrupted() -> str:
        if not parsed:
            return "interrupted"
        return interrupted_message(parsed[0].output_dir)

    return run_guarded("asvr-train", None, run, interrupted=interrupted)


def _newest(run_dir: str) -> str | None:
    from asvr.train.loop.checkpoint import latest_tag

    return latest_tag(Path(run_dir))


def interrupted_message(run_dir: str) -> str:
    """Ctrl-C's line: how to continue when a complete checkpoint exists, the truth when none does."""
    from asvr.train.loop.checkpoint import latest_tag
    from asvr.train.loop.run_folder import holds_run

    tag = latest_tag(Path(run_dir))
    if tag is not None:
        return f"interrupted; to continue from {tag} in {run_dir}, rerun the same command with --resume auto"
    again = "with --overwrite " if holds_run(Path(run_dir)) else ""
    return f"interrupted before the first checkpoint: nothing to resume in {run_dir}; rerun the same command {again}to start again"


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from asvr.train.libraries import configure

    configure(cfg.verbose)
    if cfg.preview:
        from asvr.train.data.preview import preview

        preview(cfg, cfg.preview)
        return 0
    from asvr.train.loop.preemption import StopSignals
    from asvr.train.loop.trainer import Trainer

    trainer = None
    with StopSignals() as signals:
        try:
            trainer = Trainer(cfg, signals)
            last = trainer.train()
        finally:
            if trainer is not None:
                trainer.close()
    if last and trainer.rank == 0 and cfg.progress:
        print(
            f"done: step {last['step']} loss {last['loss']:.4f} (text {last['loss_text']:.4f}, visual "
            f"{last['loss_visual']:.4f}); run in {cfg.output_dir}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
