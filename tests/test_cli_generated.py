"""Every asvr-* (sub)command is generated from its options dataclass (asvr.core.config_cli).

* each option is one dataclass field, nothing is added by hand beside ``-h`` and ``--config``;
* ``--config FILE`` (.toml, .yaml, .json) sets the options of every subcommand, and a flag given
  on the command line wins: the options built from file + flags equal those built from the same
  values given as flags (compared as the parsed config objects, not as output);
* ``run_guarded``: an ``AsvrError`` is one line and exit 2, a plain ``ValueError`` (a bug) keeps its
  traceback; every error type the project defines derives from ``AsvrError``.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest
import yaml

from asvr.core.config_cli import OPTIONS_CLASS, option_fields, options_from_args, parse_dataclass_args
from asvr.core.errors import AsvrError, CLIError, run_guarded
from asvr.eval.cli import build_parser as eval_parser
from asvr.pipeline.cli import build_parser as pipeline_parser
from asvr.pipeline.cli import main as pipeline_main
from asvr.tokenizer.cli import COMMANDS
from asvr.tokenizer.cli import build_parser as tokenizer_parser
from asvr.train.cli import build_parser as train_parser
from asvr.train.export.cli import build_parser as export_parser

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _commands():
    """(name, parser) of every command that takes options: each subcommand, or the command itself."""
    yield "asvr-train", train_parser()
    yield "asvr-export", export_parser()
    for cli, p in (("asvr-pipeline", pipeline_parser()), ("asvr-eval", eval_parser())):
        for name, sub in _subparsers(p).items():
            yield f"{cli} {name}", sub
    for name in COMMANDS:
        yield f"asvr-tokenizer {name}", _subparsers(tokenizer_parser(only=name))[name]


COMMAND_PARSERS = list(_commands())


@pytest.mark.parametrize("name,parser", COMMAND_PARSERS, ids=[n for n, _ in COMMAND_PARSERS])
def test_every_option_is_one_dataclass_field(name, parser):
    cls = parser.get_default(OPTIONS_CLASS)
    assert cls is not None, f"{name}: not generated from an options dataclass"
    fields = ["__".join(path) for path in option_fields(cls)]
    shown = [
        a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and a.dest != "config_file" and a.help != argparse.SUPPRESS
    ]
    assert sorted(shown) == sorted(fields)  # one option per field, none written by hand
    assert len(set(shown)) == len(shown)
    hidden = [a for a in parser._actions if a.help == argparse.SUPPRESS]
    assert all(a.dest in fields for a in hidden)  # an old spelling is an alias of a field, not a second option


# --------------------------------------------------------------------------- --config FILE
def _toml(d: dict, table: str = "") -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"[{table}]"] if table else []
    lines += [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", _toml(v, f"{table}.{k}" if table else k)]
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, data: dict, fmt: str) -> Path:
    path = tmp_path / f"options.{fmt}"
    text = {"toml": _toml, "yaml": yaml.safe_dump, "json": json.dumps}[fmt](data)
    path.write_text(text)
    return path


def _nest(values: list[tuple[str, object, list[str]]]) -> dict:
    out: dict = {}
    for key, value, _ in values:
        *tables, leaf = key.split(".")
        d = out
        for t in tables:
            d = d.setdefault(t, {})
        d[leaf] = value
    return out


# (builder, argv before the options, the config-file flag, [(field key, value in the file, the same as flags)],
#  (field key, value in the file, the flags that override it))
CASES = {
    "pipeline tokenize": (
        pipeline_parser,
        ["tokenize"],
        "--config",
        [
            ("inputs", ["a", "b"], ["a", "b"]),
            ("tokenizer", "tok", ["--tokenizer", "tok"]),
            ("out", "out", ["--out", "out"]),
            ("sources.image_root", "root", ["--image-root", "root"]),
            ("batch_size", 4, ["--batch-size", "4"]),
            ("progress", False, ["--no-progress"]),
        ],
        ("sources.max_read_bytes", 2**20, ["--max-read-mb", "2"]),
    ),
    "pipeline inspect": (
        pipeline_parser,
        ["inspect"],
        "--config",
        [("out", "o", ["o"])],
        ("failures", 3, ["--failures", "5"]),
    ),
    "pipeline verify": (pipeline_parser, ["verify"], "--config", [], ("out", "o", ["p"])),
    "eval loss": (
        eval_parser,
        ["loss"],
        "--config",
        [
            ("model.model", "m", ["--model", "m"]),
            ("model.device", "cpu", ["--device", "cpu"]),
            ("held_out.codes", "c", ["--codes", "c"]),
            ("held_out.data", ["d1", "d2"], ["--data", "d1", "d2"]),
            ("held_out.greedy", False, ["--no-greedy"]),
            ("out", "o", ["--out", "o"]),
        ],
        ("held_out.batch_size", 2, ["--batch-size", "4"]),
    ),
    "eval bench": (
        eval_parser,
        ["bench"],
        "--config",
        [
            ("model.model", "m", ["--model", "m"]),
            ("bench", ["b1", "b2"], ["--bench", "b1", "b2"]),
            ("generation.preprocess_mode", "pad", ["--preprocess", "pad"]),
            ("reading.scoring", "lenient", ["--scoring", "lenient"]),
            ("out", "o", ["--out", "o"]),
        ],
        ("generation.max_new_tokens", 5, ["--max-new-tokens", "7"]),
    ),
    "eval score": (
        eval_parser,
        ["score"],
        "--config",
        [("bench", "b", ["--bench", "b"]), ("predictions", "p", ["--predictions", "p"]), ("out", "o", ["--out", "o"])],
        ("reading.format", "pope", ["--format", "mme"]),
    ),
    "tokenizer train": (
        lambda: tokenizer_parser(only="train"),
        ["train"],
        "--config",
        [
            ("images", ["i1", "i2"], ["--images", "i1", "i2"]),
            ("codebooks.depth", 2, ["--depth", "2"]),
            ("codebooks.codebook_size", 8, ["--codebook-size", "8"]),
            ("codebooks.method", "rq", ["--method", "rq"]),
            ("encoding.seed", 3, ["--seed", "3"]),
            ("out", "t", ["--out", "t"]),
        ],
        ("encoding.batch_size", 2, ["--batch-size", "16"]),
    ),
    "tokenizer validate": (
        lambda: tokenizer_parser(only="validate"),
        ["validate"],
        "--config",
        [("tokenizer", "tok", ["tok"]), ("images", ["i"], ["--images", "i"]), ("report", "r", ["--report", "r"])],
        ("preprocess", "square", ["--preprocess", "pad"]),
    ),
    "tokenizer encode": (
        lambda: tokenizer_parser(only="encode"),
        ["encode"],
        "--config",
        [("tokenizer", "tok", ["tok"]), ("images", ["a.png", "b.png"], ["a.png", "b.png"])],
        ("json", False, ["--json"]),
    ),
    "tokenizer import-dualtoken": (
        lambda: tokenizer_parser(only="import-dualtoken"),
        ["import-dualtoken"],
        "--config-file",  # --config is the DualToken config folder
        [
            ("config", "cfgdir", ["--config", "cfgdir"]),
            ("checkpoint", "c.pt", ["--checkpoint", "c.pt"]),
            ("siglip", "s", ["--siglip", "s"]),
            ("out", "t", ["--out", "t"]),
        ],
        ("preprocess", "square", ["--preprocess", "pad"]),
    ),
    "tokenizer index": (
        lambda: tokenizer_parser(only="index"),
        ["index"],
        "--config",
        [("codes", "codes", ["codes"]), ("out", "idx", ["--out", "idx"]), ("add", True, ["--add"])],
        ("factory", "Flat", ["--factory", "HNSW32,Flat"]),
    ),
    "tokenizer search": (
        lambda: tokenizer_parser(only="search"),
        ["search"],
        "--config",
        [("index", "idx", ["idx"]), ("key", "a/b.jpg", ["--key", "a/b.jpg"])],  # the required one of a group
        ("k", 3, ["-k", "5"]),
    ),
    "tokenizer inspect": (
        lambda: tokenizer_parser(only="inspect"),
        ["inspect"],
        "--config",
        [("tokenizer", "tok", ["tok"]), ("code", ["0:1", "1:top"], ["--code", "0:1", "--code", "1:top"])],
        ("top", 3, ["--top", "4"]),
    ),
    "train": (
        train_parser,
        [],
        "--config",
        [
            ("model", "llm", ["--model", "llm"]),
            ("tokenizer", "tok", ["--tokenizer", "tok"]),
            ("codes", "codes", ["--codes", "codes"]),
            ("data", ["d.json"], ["--data", "d.json"]),
            ("output_dir", "run", ["--output-dir", "run"]),
            ("head.width", 256, ["--head-width", "256"]),
            ("pack", False, ["--no-pack"]),
        ],
        ("lr", 0.1, ["--lr", "0.2"]),
    ),
    "export": (export_parser, [], "--config", [("run", "run", ["run"])], ("hf_llava", "a", ["--hf-llava", "b"])),
}


def _options(builder, argv: list[str]):
    return options_from_args(parse_dataclass_args(builder(), None, argv))


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
@pytest.mark.parametrize("case", list(CASES))
def test_config_file_sets_options_and_flags_win(case, fmt, tmp_path):
    builder, cmd, flag, values, (key, in_file, override) = CASES[case]
    path = _write(tmp_path, _nest([*values, (key, in_file, [])]), fmt)
    from_file = _options(builder, [*cmd, flag, str(path), *override])
    as_flags = _options(builder, [*cmd, *[w for _, _, argv in values for w in argv], *override])
    assert from_file == as_flags
    # the file alone (it gives the required options too): its value of the overridden option is used
    obj = _options(builder, [*cmd, flag, str(path)])
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == in_file


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "o.toml"
    bad.write_text('inputs = ["a"]\ntokenizer = "t"\nout = "o"\n[sources]\nimage_rot = "r"\n')
    assert pipeline_main(["tokenize", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asvr-pipeline tokenize: error: --config ") and "unknown option 'sources.image_rot'" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_option_combination_is_one_line(capsys):
    """PipelineConfig.__post_init__'s ValueError names the options: one line, exit 2, before any Ray."""
    assert pipeline_main(["tokenize", "a", "--tokenizer", "t", "--out", "o", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "asvr-pipeline tokenize: error: --batch-size and --shard-size must be >= 1\n"


@pytest.mark.parametrize(
    "builder,argv,typo,meant",
    [
        (pipeline_parser, ["tokenize", "a", "--tokenizer", "t", "--out", "o"], "--overwirte", "--overwrite"),
        (eval_parser, ["bench", "--model", "m", "--bench", "b", "--out", "o"], "--max-itmes", "--max-items"),
        (lambda: tokenizer_parser(only="index"), ["index", "c", "--out", "o"], "--factroy", "--factory"),
        (
            train_parser,
            ["--model", "m", "--tokenizer", "t", "--codes", "c", "--data", "d", "--output-dir", "o"],
            "--grad-acum",
            "--grad-accum",
        ),
    ],
)
def test_an_unknown_flag_gets_did_you_mean(builder, argv, typo, meant, capsys):
    with pytest.raises(SystemExit) as e:
        builder().parse_args([*argv, typo])
    assert e.value.code == 2
    assert f"{typo}: did you mean {meant}" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors
class _MadeUpError(AsvrError):
    pass


def _raise(e: BaseException):
    def call():
        raise e

    return call


def test_run_guarded_turns_any_asvr_error_into_one_line(capsys):
    assert run_guarded("asvr-x", "cmd", _raise(_MadeUpError("bad input\nsecond line"))) == 2
    assert capsys.readouterr().err == "asvr-x cmd: error: bad input\n"
    assert run_guarded("asvr-x", None, _raise(CLIError("no such folder"))) == 2
    assert capsys.readouterr().err == "asvr-x: error: no such folder\n"


def test_run_guarded_keeps_the_traceback_of_a_plain_value_error():
    with pytest.raises(ValueError, match="a bug"):
        run_guarded("asvr-x", "cmd", _raise(ValueError("a bug")), (FileNotFoundError,))
    with pytest.raises(KeyError):
        run_guarded("asvr-x", "cmd", _raise(KeyError("a bug")))


def test_every_project_error_type_derives_from_asvr_error():
    """Read the class statements of every package: an error type is an AsvrError (via any chain of project
    classes), so no CLI needs a list of them."""
    bases: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for pkg in ("core", "tokenizer", "pipeline", "train", "eval"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ClassDef):
                    names = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                    bases[node.name], where[node.name] = names, str(f.relative_to(ROOT))

    def derives(name: str, seen=()) -> bool:
        if name == "AsvrError":
            return True
        return any(b in bases and b not in seen and derives(b, (*seen, name)) for b in bases.get(name, []))

    errors = [n for n, b in bases.items() if n.endswith("Error") and n != "AsvrError"]
    assert len(errors) > 20
    assert [f"{where[n]}: {n}" for n in errors if not derives(n)] == []
    assert bases["AsvrError"] == ["ValueError"]  # `except ValueError` callers keep working
