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
``bad_samples.jsonl`` (when --skip-bad-samples dropped some) and ``final/``:
the exported model, loaded with ``asvr.train.export.load_exported(RUN/final)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import VisualHeadConfig


class CLIError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asvr-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", required=True, help="LLM: a local Hugging Face folder (config, weights, tokenizer)")
    io.add_argument("--tokenizer", required=True, help="semantic tokenizer artifact folder (asvr-tokenizer)")
    io.add_argument("--codes", required=True, help="code shards written with that tokenizer (asvr-pipeline tokenize)")
    io.add_argument("--data", required=True, nargs="+", help="LLaVA JSON conversation file(s): id, image, conversations")
    io.add_argument("--images", help="image root (LLaVA 'image' paths are relative to it); online/features inputs")
    io.add_argument("--output-dir", required=True, help="run folder")
    io.add_argument("--cache-dir", help="feature / shard-index cache (default RUN/cache); share it between runs "
                                        "on the same images to compute the encoder features once")
    m = p.add_argument_group("model")
    m.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain",
                   help="pretrain: projector + visual head, LLM frozen; sft: also the LLM (default pretrain)")
    m.add_argument("--vision-input", choices=["online", "features", "codes"], default="codes",
                   help="online: frozen encoder on the images every step; features: encoder features cached once in "
                        "RUN/cache; codes: features rebuilt from the cached codes, no images (default codes)")
    m.add_argument("--init-from", help="start from an exported model: a pretrain run folder (its final/) or an export folder")
    m.add_argument("--template", choices=["plain", "vicuna_v1", "chatml"],
                   help="conversation template (default: plain for pretrain, vicuna_v1 for sft)")
    m.add_argument("--visual-loss-weight", type=float, default=1.0, help="lambda of the visual loss (default 1)")
    d = VisualHeadConfig()
    m.add_argument("--head-width", type=int, default=d.width, help=f"visual head depth-transformer width ({d.width})")
    m.add_argument("--head-proj-hidden", type=int, default=d.proj_hidden, help=f"visual head projector hidden ({d.proj_hidden})")
    m.add_argument("--head-layers", type=int, default=d.layers, help=f"visual head layers ({d.layers})")
    m.add_argument("--head-dim", type=int, default=d.head_dim, help=f"visual head attention head size ({d.head_dim})")
    m.add_argument("--attn-implementation", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"])
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    m.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped in --model")
    t = p.add_argument_group("optimisation")
    t.add_argument("--zero", type=int, choices=[2, 3], default=2, help="ZeRO stage without --deepspeed (default 2)")
    t.add_argument("--deepspeed", help="DeepSpeed JSON config (batch sizes / accumulation / clipping come from our flags)")
    t.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--micro-batch-size", type=int, default=1, help="packed rows per micro-batch per process")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--max-len", type=int, default=2048, help="tokens per packed row (default 2048)")
    t.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one sample per row, padded to the longest in the micro-batch")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 pretrain, 2e-5 sft)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup share of the steps, then cosine")
    t.add_argument("--min-lr-ratio", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    dd = p.add_argument_group("data")
    dd.add_argument("--caption-free-ratio", type=float, default=0.0,
                    help="share of caption-free shard rows (no conversation: visual loss only) in the mix; 1 = all")
    dd.add_argument("--skip-bad-samples", action="store_true",
                    help="skip (and list in RUN/bad_samples.jsonl) samples with missing images, keys absent from the "
                         "shards or malformed conversations, instead of stopping")
    dd.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    r = p.add_argument_group("checkpoints and logging")
    r.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    r.add_argument("--resume", help="'auto': continue from the newest checkpoint in --output-dir; or a tag")
    r.add_argument("--stop-after", type=int, help="end this invocation after N steps with a checkpoint (the "
                   "schedule still spans --max-steps; rerun with --resume auto): jobs with a wall-time limit")
    r.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    r.add_argument("--no-export", dest="export", action="store_false", help="do not write RUN/final")
    r.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    return p


def config_from_args(a: argparse.Namespace):
    from .trainer import TrainConfig

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
    if a.images and not Path(a.images).is_dir():
        raise CLIError(f"--images {a.images}: no such folder")
    head = VisualHeadConfig(width=a.head_width, proj_hidden=a.head_proj_hidden, layers=a.head_layers,
                            head_dim=a.head_dim)
    return TrainConfig(
        model=a.model, tokenizer=a.tokenizer, codes=a.codes, data=a.data, output_dir=a.output_dir, stage=a.stage,
        vision_input=a.vision_input, images=a.images, cache_dir=a.cache_dir, template=a.template, zero=a.zero, deepspeed=a.deepspeed,
        max_steps=a.max_steps, epochs=a.epochs, micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum,
        max_len=a.max_len, pack=a.pack, lr=a.lr, weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio,
        min_lr_ratio=a.min_lr_ratio, grad_clip=a.grad_clip, seed=a.seed, save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints, resume=a.resume, stop_after=a.stop_after, init_from=a.init_from,
        gradient_checkpointing=a.gradient_checkpointing, caption_free_ratio=a.caption_free_ratio,
        skip_bad_samples=a.skip_bad_samples, num_workers=a.num_workers, tensorboard=a.tensorboard, export=a.export,
        progress=not a.quiet, head=head, visual_loss_weight=a.visual_loss_weight,
        attn_implementation=a.attn_implementation, trust_remote_code=a.trust_remote_code)


def main(argv: list[str] | None = None) -> int:
    from asvr.pipeline.shards import ShardError
    from asvr.tokenizer.artifact import TokenizerError
    from asvr.tokenizer.preprocess import ImageError

    from .export import ExportError
    from .sources import DataError
    from .templates import ConversationError

    args = build_parser().parse_args(argv)
    expected = (CLIError, DataError, ShardError, TokenizerError, ImageError, ExportError, ConversationError)
    try:
        cfg = config_from_args(args)
    except (ValueError, *expected) as e:
        print(f"asvr-train: error: {e}", file=sys.stderr)
        return 2
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
