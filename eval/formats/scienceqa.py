"""Bench format ``scienceqa``: the ScienceQA TSV of VLMEvalKit (the MMBench layout),
asked and scored as lmms-eval's ScienceQA.

Registered like a plug-in; detected (after the plug-ins) by the MMBench header in a
file whose name holds ``scienceqa`` or starts with ``sqa``.
"""

from __future__ import annotations

from pathlib import Path

from asvr.eval.formats.base import BenchFormat, BenchItem, register_bench_format, sniff
from asvr.eval.formats.mmbench import _lmms_choice, has_mmbench_header, is_scienceqa_name, read_mmbench


def read_scienceqa(path: Path, images=None) -> list[BenchItem]:
    """The ScienceQA TSV of VLMEvalKit (the MMBench layout): lmms-eval's ScienceQA prompt and scoring."""
    return read_mmbench(path, images, task="scienceqa")


register_bench_format(
    BenchFormat(
        "scienceqa",
        read_scienceqa,
        detect=lambda path: has_mmbench_header(sniff(path)) and is_scienceqa_name(path),
        lmms_choice=_lmms_choice("scienceqa"),
        detect_last=True,
    )
)
