"""A command line generated from (nested) config dataclasses, and config files.

Each field of the dataclass becomes one option, written once: its name gives
the flag (``max_len`` -> ``--max-len``; a nested dataclass field ``head``
prefixes its own fields: ``head.width`` -> ``--head-width``, and
``head.head_dim`` -> ``--head-dim``, the prefix is not repeated), its type
the parsing (``int``, ``float``, ``str``, ``X | None``, ``list[str]`` ->
``nargs="+"``, ``bool`` -> a switch), its default the default, and the
docstring under it the ``--help`` text (torchtitan's job_config habit).
``dataclasses.field(metadata=...)`` adds what a name cannot say:

* ``flag``: another flag name (``--no-pack`` for ``pack: bool = True``,
  ``--quiet`` for ``progress``); a switch whose default is True stores False;
* ``choices``: the allowed values, from the one list that defines them;
* ``group``: the ``--help`` section; ``metavar``; ``cli=False``: not an option;
* ``positional=True``: an argument, not a flag (``INPUT...`` for a list);
  ``short``: a one-letter spelling beside the flag (``-v``); ``aliases``: old
  spellings still parsed, not shown; ``append=True``: a list given by
  repeating the flag (``--code 0:1 --code 1:2``); ``exclusive``: the name of
  a mutually exclusive group (``exclusive_required=True`` on one member: one
  of them must be given);
* ``type``: how the command-line string becomes the value, when the flag's
  unit is not the field's (``--max-read-mb`` fills ``max_read_bytes``);
  ``show_default=False``: no ``(default X)`` after the help (it is not
  added either when the help already says what the default is);
* on a nested dataclass field, ``prefix``: the prefix of its fields' flags
  (``prefix=""``: none, for a component whose flags are plain words).

Choices shown by ``--help`` may be a callable, called when the parser is
built: the registries (input formats, bench formats, encoders) hold plug-ins
registered at import time.

A command with subcommands builds each with :func:`add_command` (its own
options class, its own ``--config``); :func:`parse_dataclass_args` finds the
subcommand in ``argv`` and applies the file to that subparser.

``--config FILE`` (``.toml``, ``.yaml``/``.yml`` or ``.json``; keys are the
field names, a nested dataclass a table) sets the defaults: flags given on
the command line win over the file, the file over the dataclass.  The
resolved config a run stores (``RUN/train_config.json``) is such a file, so
``--config RUN/train_config.json`` reproduces the run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from asvr.core.errors import AsvrError, CLIError


OPTIONS_CLASS = "options_class"
"""Namespace attribute holding the options dataclass of the (sub)command that was parsed."""
CONFIG_HELP = "options from a .toml/.yaml/.json file (field names as keys, a component a table); flags given here win"


class ConfigFileError(AsvrError):
    """A bad --config file; the message is one line."""


def field_docs(cls: Any) -> dict[str, str]:
    """The docstring under each field of a dataclass (its attribute docstrings), joined into one line."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    body = node.body
    out = {}
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            out[a.target.id] = " ".join(b.value.value.split())
    return out


def _unwrap(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(prefix: str, name: str) -> str:
    if prefix and not name.startswith(prefix + "_"):
        name = f"{prefix}_{name}"
    return "--" + name.replace("_", "-")


def _dest(path: Sequence[str]) -> str:
    return "__".join(path)


def _walk(cls: Any, path: tuple[str, ...] = (), prefix: str = ""):
    """-> (field path, field, type hint, owner class, flag prefix) for every leaf field, nested dataclasses
    flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp) and f.metadata.get("cli", True):
            yield from _walk(tp, path + (f.name,), f.metadata.get("prefix", f.name))
        else:
            yield path + (f.name,), f, hints[f.name], cls, prefix


def option_fields(cls: Any) -> list[tuple[str, ...]]:
    """The field path of every command-line option of ``cls`` (tests: each option is one field)."""
    return [path for path, f, *_ in _walk(cls) if f.metadata.get("cli", True)]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _help(f: dataclasses.Field, docs: dict[str, str], default: Any) -> str:
    help_ = f.metadata.get("help") or docs.get(f.name, "")
    shown = f.metadata.get("show_default", True) and "default" not in help_
    if shown and default is not dataclasses.MISSING and not isinstance(default, bool) and default not in (None, [], ()):
        help_ = f"{help_} (default {default})" if help_ else f"(default {default})"
    return help_


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: Any, groups: dict[str, str] | None = None) -> None:
    """One option per leaf field of ``cls`` (see module doc).  ``groups`` titles the ``--help`` sections
    (a field's ``group``, else its component's field name); the group ``options`` is the parser's own."""
    made: dict[str, Any] = {"options": parser}
    exclusive: dict[str, Any] = {}
    docs_cache: dict[Any, dict[str, str]] = {}
    for path, f, hint, owner, prefix in _walk(cls):
        if not f.metadata.get("cli", True):
            continue
        docs = docs_cache.setdefault(owner, field_docs(owner))
        group_name = f.metadata.get("group") or (path[0] if len(path) > 1 else "options")
        title = (groups or {}).get(group_name, group_name)
        if title not in made:
            made[title] = parser.add_argument_group(title)
        g = made[title]
        if "exclusive" in f.metadata:
            name = f.metadata["exclusive"]
            if name not in exclusive:
                exclusive[name] = g.add_mutually_exclusive_group()
            exclusive[name].required |= bool(f.metadata.get("exclusive_required"))
            g = exclusive[name]
        _add_one(parser if f.metadata.get("positional") else g, path, f, hint, prefix, docs)


def _add_one(g, path: tuple[str, ...], f: dataclasses.Field, hint: Any, prefix: str, docs: dict[str, str]) -> None:
    tp, _ = _unwrap(hint)
    default = _default(f)
    md = f.metadata
    help_ = _help(f, docs, default)
    kw: dict[str, Any] = {}
    if md.get("positional"):
        names: list[str] = [_dest(path)]
    else:
        names = [md.get("flag") or _flag(prefix, path[-1])]
        names = [md["short"], *names] if "short" in md else names
        kw["dest"] = _dest(path)
    if tp is bool:
        kw["action"] = "store_false" if default is True else "store_true"
        g.add_argument(*names, help=help_, **kw)
        return
    if typing.get_origin(tp) is list:
        kw["action" if md.get("append") else "nargs"] = "append" if md.get("append") else "+"
        tp = typing.get_args(tp)[0]
    kw["type"] = md.get("type", tp)
    choices = md.get("choices")
    if choices is not None:
        kw["choices"] = list(choices() if callable(choices) else choices)
    kw["metavar"] = md.get("metavar") or (None if choices is not None else path[-1].upper())
    if default is dataclasses.MISSING:
        if not md.get("positional"):
            kw["required"] = True
    else:
        kw["default"] = default
        if md.get("positional") and "nargs" not in kw:
            kw["nargs"] = "?"
    g.add_argument(*names, help=help_ or None, **kw)
    for alias in md.get("aliases", ()):
        g.add_argument(alias, **{**kw, "help": argparse.SUPPRESS, "required": False})


def add_config_argument(parser: argparse.ArgumentParser, cls: Any, flag: str = "--config", help: str = CONFIG_HELP):
    """``--config FILE`` (or ``flag``, for a command that has a ``--config`` of its own) for ``cls``."""
    parser.add_argument(flag, metavar="FILE", dest="config_file", help=help)
    parser.set_defaults(**{OPTIONS_CLASS: cls, "config_flag": flag})


def add_command(
    sub: Any, name: str, cls: Any, *, config_flag: str = "--config", groups: dict[str, str] | None = None, **kw
) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``cls``, with its own ``--config FILE``."""
    p = sub.add_parser(name, **kw)
    add_config_argument(p, cls, config_flag)
    add_dataclass_arguments(p, cls, groups)
    return p


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigFileError(f"--config {p}: use a .toml, .yaml or .json file")
    except ConfigFileError:
        raise
    except Exception as e:  # OSError, TOMLDecodeError, YAMLError, JSONDecodeError: one line each
        raise ConfigFileError(f"--config {p}: cannot read ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {p}: expected a table of options")
    return data


def _flatten(cls: Any, data: dict[str, Any], source: str, path: tuple[str, ...] = ()) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in data.items():
        if k not in known:
            where = ".".join(path + (k,))
            raise ConfigFileError(f"{source}: unknown option {where!r} (known: {', '.join(sorted(known))})")
        tp, _ = _unwrap(hints[k])
        if dataclasses.is_dataclass(tp) and known[k].metadata.get("cli", True):
            if not isinstance(v, dict):
                raise ConfigFileError(f"{source}: {'.'.join(path + (k,))} must be a table")
            out.update(_flatten(tp, v, source, path + (k,)))
        else:
            out[_dest(path + (k,))] = v
    return out


def apply_config_file(parser: argparse.ArgumentParser, cls: Any, path: str) -> None:
    """The file's values become ``parser``'s defaults; an option they give is no longer required."""
    values = _flatten(cls, read_config_file(path), f"--config {path}")
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False
            if not action.option_strings:  # a positional the file gives: optional on the command line
                action.nargs = "*" if action.nargs in ("+", "*") else "?"
    for group in parser._mutually_exclusive_groups:
        if any(a.dest in values for a in group._group_actions):
            group.required = False


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """-> (the subparser of the command named in ``argv``, the arguments after it); ``parser`` itself when it
    has no subcommands or none is named."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, word in enumerate(argv):
                if not word.startswith("-"):
                    sub = action.choices.get(word)
                    return (sub, argv[i + 1 :]) if sub is not None else (parser, argv)
    return parser, argv


def _config_reader(target: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A parser that reads only the config flag of ``target`` from its arguments: the other options are there
    too (values ignored), so an abbreviation or a value means what it means to ``target``
    (``import-dualtoken --config DIR`` is not its ``--config-file``)."""
    flag = target.get_default("config_flag") or "--config"
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(flag, dest="config_file")
    for i, a in enumerate(target._actions):
        names = [s for s in a.option_strings if s != flag]
        if names and not isinstance(a, argparse._HelpAction):
            if a.nargs == 0:
                pre.add_argument(*names, dest=f"_{i}", action="store_true")
            else:
                pre.add_argument(*names, dest=f"_{i}", nargs=a.nargs)
    return pre


def parse_dataclass_args(
    parser: argparse.ArgumentParser, cls: Any = None, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` with ``--config FILE`` defaults applied (flags win).  ``cls`` None: the options class
    of the subcommand named in ``argv`` (:func:`add_command`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    target, rest = _command_parser(parser, args)
    cls = cls or target.get_default(OPTIONS_CLASS)
    if cls is not None:
        known, _ = _config_reader(target).parse_known_args(rest)
        if known.config_file:
            apply_config_file(target, cls, known.config_file)
    return parser.parse_args(args)


def options_from_args(ns: argparse.Namespace, **overrides):
    """The options dataclass of the parsed (sub)command, built from ``ns``.  A ``ValueError`` of a
    ``__post_init__`` names a bad combination of options: it becomes a :class:`CLIError` (one line)."""
    try:
        return dataclass_from_args(getattr(ns, OPTIONS_CLASS), ns, **overrides)
    except AsvrError:
        raise
    except ValueError as e:
        raise CLIError(str(e)) from None


def dataclass_from_args(cls: Any, ns: argparse.Namespace, path: tuple[str, ...] = (), **overrides):
    """Build ``cls`` (nested dataclasses included) from a namespace of :func:`add_dataclass_arguments`."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        if f.name in overrides:
            kw[f.name] = overrides[f.name]
        elif not f.metadata.get("cli", True):
            continue
        elif dataclasses.is_dataclass(tp):
            kw[f.name] = dataclass_from_args(tp, ns, path + (f.name,))
        else:
            kw[f.name] = getattr(ns, _dest(path + (f.name,)))
    return cls(**kw)
