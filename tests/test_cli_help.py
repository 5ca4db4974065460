"""Every asvr-* --help: plain text (no reStructuredText markup), the names the commands use."""

from __future__ import annotations

import re

import pytest

from asvr.eval.cli import main as eval_main
from asvr.pipeline.cli import main as pipeline_main
from asvr.tokenizer.cli import COMMANDS
from asvr.tokenizer.cli import main as tokenizer_main
from asvr.train.cli import main as train_main
from asvr.demo.sample_corpus import main as sample_corpus_main
from asvr.train.export.cli import main as export_main
from asvr.demo.tiny_llm import main as tiny_llm_main

HELPS = (
    [(tokenizer_main, [c]) for c in COMMANDS]
    + [(tokenizer_main, [])]
    + [(pipeline_main, [c]) for c in ("tokenize", "inspect", "verify")]
    + [(pipeline_main, [])]
    + [(eval_main, [c]) for c in ("loss", "bench", "score")]
    + [(eval_main, [])]
    + [(train_main, []), (tiny_llm_main, []), (sample_corpus_main, []), (export_main, [])]
)


def help_text(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("main,argv", HELPS, ids=[f"{m.__module__}:{' '.join(a)}" for m, a in HELPS])
def test_help_is_plain_text(main, argv, capsys):
    text = help_text(main, argv, capsys)
    assert "``" not in text
    assert not re.search(r"::\s*$", text, re.M)
    assert not re.search(r":(mod|class|func|meth):`", text)


def test_help_names(capsys):
    index = help_text(tokenizer_main, ["index"], capsys)
    assert "asvr-tokenizer index [-h]" in index and " CODES" in index and " OUT " not in index
    bench = help_text(eval_main, ["bench"], capsys)
    assert "--preprocess {square,pad}" in bench and "--preprocess-mode" not in bench
    top = help_text(eval_main, [], capsys)
    assert "predictions.jsonl" in top and "predictions-*" not in top
    assert "--overwrite" in help_text(train_main, [], capsys)


def test_old_preprocess_mode_name_still_parses():
    from asvr.core.config_cli import options_from_args
    from asvr.eval.cli import build_parser

    def preprocess(*flags: str) -> str | None:
        base = ["bench", "--model", "m", "--bench", "b.jsonl", "--out", "o"]
        return options_from_args(build_parser().parse_args([*base, *flags])).generation.preprocess_mode

    assert preprocess("--preprocess-mode", "pad") == "pad"
    assert preprocess("--preprocess", "square") == "square"
