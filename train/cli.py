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
(the exported model, loaded with ``asvr.train.export.load_exported(RUN/final)``)
and ``train_config.json``, the resolved options: ``--config RUN/train_config.json``
(or any .toml/.yaml with the same keys) runs it again; flags override the file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asvr.tokenizer.help_text import plain

from .config import TrainConfig
from .config_cli import ConfigFileError, add_dataclass_arguments, dataclass_from_args, parse_dataclass_args


class CLIError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    """Every option is a ``TrainConfig`` field (``train/config.py``): its docstring is the help."""
    p = argparse.ArgumentParser(prog="asvr-train", description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="options from a .toml/.yaml/.json file (field names as keys, [head] a table); flags given "
                        "here win. RUN/train_config.json is one: --config RUN/train_config.json reproduces RUN")
    add_dataclass_arguments(p, TrainConfig, groups={"head": "model: visual head"})
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    for name in ("model", "tokenizer", "codes"):
        if not Path(getattr(a, name)).exists():
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
    return dataclass_from_args(TrainConfig, a)


def main(argv: list[str] | None = None) -> int:
    from asvr.pipeline.shards import ShardError
    from asvr.tokenizer.artifact import TokenizerError
    from asvr.tokenizer.preprocess import ImageError

    from .checkpoint import CheckpointError
    from .export import ExportError
    from .sources import DataError
    from .templates import ConversationError
    from .trainer import RunFolderError
    from .vision_tower import VisionTowerError

    expected = (CLIError, RunFolderError, DataError, ShardError, TokenizerError, ImageError, ExportError,
                ConversationError, VisionTowerError, ConfigFileError, CheckpointError)
    try:
        args = parse_dataclass_args(build_parser(), TrainConfig, argv)
        cfg = config_from_args(args)
    except (ValueError, *expected) as e:
        print(f"asvr-train: error: {e}", file=sys.stderr)
        return 2
    from .libraries import configure

    configure(cfg.verbose)
    if cfg.preview:
        from .preview import preview

        try:
            preview(cfg, cfg.preview)
        except expected as e:
            print(f"asvr-train: error: {e}", file=sys.stderr)
            return 2
        return 0
    from .trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        last = trainer.train()
    except expected as e:
        print(f"asvr-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    if last and trainer.rank == 0 and cfg.progress:
        print(f"done: step {last['step']} loss {last['loss']:.4f} (text {last['loss_text']:.4f}, visual "
              f"{last['loss_visual']:.4f}); run in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
