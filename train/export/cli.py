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

from asvr.core.cli_parser import OneLineParser
from asvr.core.help_text import plain


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="asvr-export",
        description=plain(__doc__.split("\n\n")[0]),
        epilog=plain(__doc__.split("\n\n", 2)[2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="an asvr-train run folder (its final/) or an export folder")
    p.add_argument("--hf-llava", metavar="OUT", required=True, help="write a Hugging Face LLaVA folder here")
    p.add_argument("--tokenizer", metavar="DIR", help="the semantic tokenizer artifact, when it moved since training")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT when it holds an earlier LLaVA export (a file, or a folder of anything else, is "
        "always refused)",
    )
    return p


def _export(args: argparse.Namespace) -> int:
    from asvr.tokenizer.model import SemanticTokenizer

    from asvr.train.export.hf_llava import export_hf_llava

    tok = SemanticTokenizer.load(args.tokenizer) if args.tokenizer else None
    out = export_hf_llava(
        args.run, args.hf_llava, tokenizer=tok, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    print(f"wrote a Hugging Face LLaVA folder to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from asvr.tokenizer.encoders.base import EncoderLoadError
    from asvr.core.errors import TokenizerError, run_guarded

    from asvr.train.export.native import ExportError
    from asvr.train.export.hf_llava import HFExportError
    from asvr.train.loop.run_folder import DiskFullError

    return run_guarded(
        "asvr-export",
        "--hf-llava",
        lambda: _export(args),
        (
            HFExportError,
            ExportError,
            TokenizerError,
            EncoderLoadError,
            FileNotFoundError,
            FileExistsError,
            DiskFullError,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
