"""``asvr-export``: write a trained ASVR model in formats other tools load.

    asvr-export runs/sft --hf-llava llava_out/

``--hf-llava OUT`` writes a standard Hugging Face ``LlavaForConditionalGeneration``
folder (config, safetensors, processor, chat template) when the LLM's input
came from a Hugging Face SigLIP/CLIP vision tower (``--vision-input online`` or
``features``).  transformers, vLLM (``vllm serve OUT``) and lmms-eval
(``--model llava_hf``) load it as any LLaVA-1.5; ``asvr-eval bench --model OUT``
scores it with this project's harness.  The training-only visual head is saved
in ``OUT/asvr_visual_head/``, outside the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from asvr.core.cli_parser import OneLineParser
from asvr.core.config_cli import add_config_argument, add_dataclass_arguments, options_from_args, parse_dataclass_args
from asvr.core.errors import run_guarded
from asvr.core.help_text import plain


@dataclass(kw_only=True)
class ExportOptions:
    """``asvr-export``; every field is an option (``asvr.core.config_cli``)."""

    run: str = field(metadata={"positional": True, "metavar": "RUN"})
    """An asvr-train run folder (its final/) or an export folder."""
    hf_llava: str = field(metadata={"metavar": "OUT"})
    """Write a Hugging Face LLaVA folder here."""
    tokenizer: str | None = field(default=None, metadata={"metavar": "DIR"})
    """The semantic tokenizer artifact, when it moved since training."""
    max_shard_size: str = "5GB"
    """Safetensors shard size."""
    overwrite: bool = False
    """Replace OUT when it holds an earlier LLaVA export (a file, or a folder of anything else, is always
    refused)."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="asvr-export",
        description=plain(__doc__.split("\n\n")[0]),
        epilog=plain(__doc__.split("\n\n", 2)[2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p, ExportOptions)
    add_dataclass_arguments(p, ExportOptions)
    return p


def _export(o: ExportOptions) -> int:
    from asvr.tokenizer.model import SemanticTokenizer

    from asvr.train.export.hf_llava import export_hf_llava

    tok = SemanticTokenizer.load(o.tokenizer) if o.tokenizer else None
    out = export_hf_llava(o.run, o.hf_llava, tokenizer=tok, max_shard_size=o.max_shard_size, overwrite=o.overwrite)
    print(f"wrote a Hugging Face LLaVA folder to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    def run() -> int:  # parsed inside the guard: a bad --config file is one line too
        return _export(options_from_args(parse_dataclass_args(build_parser(), ExportOptions, argv)))

    return run_guarded("asvr-export", "--hf-llava", run, (FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
