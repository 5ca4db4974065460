"""asvr-train's command line is generated from TrainConfig: one option per field,
its docstring the help; --config files (TOML, YAML, JSON) set defaults, flags win;
the README's and Makefile's asvr-train commands still parse to what they meant."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from asvr.train.cli import build_parser, main
from asvr.train.config import TrainConfig, VisualHeadConfig
from asvr.core.config_cli import ConfigFileError, dataclass_from_args, field_docs, parse_dataclass_args

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--model", "m", "--tokenizer", "t", "--codes", "c", "--data", "d.json", "--output-dir", "o"]


def _parse(argv) -> TrainConfig:
    return dataclass_from_args(TrainConfig, parse_dataclass_args(build_parser(), TrainConfig, argv))


def test_every_field_is_one_documented_option():
    help_text = " ".join(build_parser().format_help().split())
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "head":
            continue
        assert docs.get(f.name), f"TrainConfig.{f.name} has no docstring"
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert " ".join(docs[f.name].split())[:40] in help_text, f.name  # the docstring is the help
    for f in dataclasses.fields(VisualHeadConfig):
        flag = "--" + ("" if f.name.startswith("head_") else "head-") + f.name.replace("_", "-")
        assert flag in help_text, flag
    assert "--head-dim" in help_text and "--head-head-dim" not in help_text


def test_choices_come_from_the_one_list():
    from asvr.train.data.templates import TEMPLATES
    from asvr.train.model.vision_input import VISION_INPUTS

    actions = {a.dest: a for a in build_parser()._actions}
    assert actions["vision_input"].choices == list(VISION_INPUTS)
    assert actions["template"].choices == list(TEMPLATES)


def test_defaults_and_switches():
    cfg = _parse(REQUIRED)
    assert (cfg.stage, cfg.vision_input, cfg.zero, cfg.max_len, cfg.lr, cfg.template) == (
        "pretrain",
        "codes",
        "auto",
        2048,
        1e-3,
        "plain",
    )
    assert cfg.pack and cfg.export and cfg.progress and cfg.head == VisualHeadConfig()
    cfg = _parse(
        REQUIRED
        + ["--no-pack", "--no-export", "--quiet", "--stage", "sft", "--head-dim", "64", "--data", "a.json", "b.json"]
    )
    assert not cfg.pack and not cfg.export and not cfg.progress
    assert (cfg.lr, cfg.template, cfg.head.head_dim, cfg.data) == (2e-5, "vicuna_v1", 64, ["a.json", "b.json"])


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_file_sets_defaults_and_flags_win(tmp_path, suffix):
    values = {
        "model": "m",
        "tokenizer": "t",
        "codes": "c",
        "data": ["d.json"],
        "output_dir": "o",
        "stage": "sft",
        "max_len": 512,
        "pack": False,
        "head": {"width": 128, "head_dim": 32},
    }
    f = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        f.write_text(
            'model = "m"\ntokenizer = "t"\ncodes = "c"\ndata = ["d.json"]\noutput_dir = "o"\nstage = "sft"\n'
            "max_len = 512\npack = false\n[head]\nwidth = 128\nhead_dim = 32\n"
        )
    elif suffix == ".yaml":
        import yaml

        f.write_text(yaml.safe_dump(values))
    else:
        f.write_text(json.dumps(values))
    cfg = _parse(["--config", str(f), "--max-len", "256"])
    assert (cfg.model, cfg.stage, cfg.max_len, cfg.pack, cfg.head.width, cfg.head.head_dim, cfg.head.layers) == (
        "m",
        "sft",
        256,
        False,
        128,
        32,
        3,
    )


def test_bad_config_file_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('model = "m"\nmax_lenn = 3\n')
    with pytest.raises(ConfigFileError, match="unknown option 'max_lenn'"):
        _parse(["--config", str(f)])
    assert main(["--config", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asvr-train: error:") and "\n" not in err
    f.write_text("model = [")
    assert main(["--config", str(f)]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def _commands(text: str) -> list[list[str]]:
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.search(r"(?:asvr-train|-m asvr\.train\.cli)\s+(.*)", line)
        if m:
            out.append(shlex.split(m.group(1)))
    return out


def test_readme_and_makefile_commands_parse_unchanged():
    make = (ROOT / "Makefile").read_text()
    demo_train = shlex.split(re.search(r"^DEMO_TRAIN \?= (.*)$", make, re.M).group(1))
    readme = (ROOT / "README.md").read_text()
    cmds = _commands("\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S)))  # its code blocks
    for argv in _commands(make):
        argv = [a.replace("$(DEMO)", "demo_out") for a in argv]
        i = argv.index("$(DEMO_TRAIN)")
        cmds.append(argv[:i] + demo_train + argv[i + 1 :])
    assert len(cmds) >= 5
    for argv in cmds:
        cfg = _parse(argv)
        assert cfg.model and cfg.output_dir and (cfg.data or cfg.packed)  # --packed: conversations are in the shards
    sft = _parse(cmds[-1])  # the demo's SFT step
    assert (
        sft.stage,
        sft.vision_input,
        sft.max_steps,
        sft.micro_batch_size,
        sft.lr,
        sft.head.width,
        sft.max_len,
        sft.save_every,
        sft.init_from,
    ) == ("sft", "features", 1000, 4, 2e-3, 128, 512, 100, "demo_out/runs/pretrain")


@pytest.mark.parametrize(("value", "want"), [(2, "2"), (3, "3"), ("auto", "auto"), ("0", "0")])
def test_config_file_zero_written_before_auto_still_reads(tmp_path, value, want):
    """A train_config.json from before ``--zero auto`` holds ``"zero": 2`` (an int)."""
    f = tmp_path / "train_config.json"
    f.write_text(
        json.dumps({"model": "m", "tokenizer": "t", "codes": "c", "data": ["d"], "output_dir": "o", "zero": value})
    )
    assert _parse(["--config", str(f)]).zero == want


def test_config_file_zero_out_of_range_is_refused(tmp_path):
    f = tmp_path / "train_config.json"
    f.write_text(
        json.dumps({"model": "m", "tokenizer": "t", "codes": "c", "data": ["d"], "output_dir": "o", "zero": 4})
    )
    with pytest.raises(ValueError, match=r"--zero must be one of \('auto', '0', '1', '2', '3'\), got 4"):
        _parse(["--config", str(f)])
