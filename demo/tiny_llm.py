"""A tiny, offline Hugging Face LLM folder: config + trained tokenizer + random weights.

Tests and ``make demo`` need "a tiny Llama-style LLM built from a config"
that ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load like a
real one, without the network.  The tokenizer is a byte-level BPE trained on
the given texts in a few milliseconds (any text encodes; vocab ~ 300-1000),
with the special tokens the templates use (``<s>``, ``</s>``, ``<pad>``,
``<|im_start|>``, ``<|im_end|>``).

    python -m asvr.demo.tiny_llm --out demo_out/llm --texts demo_out/corpus/llava_sft.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterable

from asvr.core.help_text import plain

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0..5: pad 0, bos 1, eos 2


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE as a ``PreTrainedTokenizerFast`` (pad 0, bos 1, eos 2; BOS added as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # BOS on every encoding with special tokens, as a Llama tokenizer (LLaVA's templates count on it)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def conversation_texts(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Every string value of LLaVA JSON files (training text for the BPE)."""
    out: list[str] = []
    for p in paths:
        for rec in json.loads(Path(p).read_text()):
            for turn in rec.get("conversations", []) if isinstance(rec, dict) else []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    out.append(turn["value"])
    return out


def make_tiny_llm(
    folder: str | os.PathLike,
    family: str = "llama",
    texts: Iterable[str] = (),
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a loadable LLM folder (config.json, model.safetensors, tokenizer files)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from asvr.train.model.config import tiny_llm_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = [
        "A chat between a curious human and an artificial intelligence assistant.",
        "USER: What is in the image? ASSISTANT: A picture.",
        "The quick brown fox jumps over the lazy dog.",
    ]
    tok = train_bpe_tokenizer(base + list(texts), vocab_size)
    cfg = tiny_llm_config(
        family,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_positions=max_positions,
    )
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asvr.demo.tiny_llm",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--family", default="llama", choices=["llama", "qwen2", "mistral"])
    p.add_argument("--texts", nargs="*", default=[], help="LLaVA JSON files whose text trains the BPE tokenizer")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128, help="MLP width")
    args = p.parse_args(argv)
    out = make_tiny_llm(
        args.out,
        args.family,
        conversation_texts(args.texts),
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        intermediate_size=args.intermediate_size,
    )
    print(f"wrote a tiny {args.family} LLM to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
