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
* ``group``: the ``--help`` section; ``metavar``; ``cli=False``: not an option.

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


class ConfigFileError(ValueError):
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


def _walk(cls: Any, path: tuple[str, ...] = ()):
    """-> (field path, field, resolved type) for every leaf field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp) and f.metadata.get("cli", True):
            yield from _walk(tp, path + (f.name,))
        else:
            yield path + (f.name,), f, hints[f.name], cls


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: Any, groups: dict[str, str] | None = None) -> None:
    """One option per leaf field of ``cls`` (see module doc)."""
    made: dict[str, argparse._ArgumentGroup] = {}
    docs_cache: dict[Any, dict[str, str]] = {}
    for path, f, hint, owner in _walk(cls):
        if not f.metadata.get("cli", True):
            continue
        docs = docs_cache.setdefault(owner, field_docs(owner))
        group_name = f.metadata.get("group") or (path[0] if len(path) > 1 else "options")
        if group_name not in made:
            made[group_name] = parser.add_argument_group((groups or {}).get(group_name, group_name))
        g = made[group_name]
        tp, optional = _unwrap(hint)
        default = _default(f)
        flag = f.metadata.get("flag") or _flag(path[-2] if len(path) > 1 else "", path[-1])
        help_ = f.metadata.get("help") or docs.get(f.name, "")
        kw: dict[str, Any] = {"dest": _dest(path)}
        if tp is bool:
            kw["action"] = "store_false" if default is True else "store_true"
            g.add_argument(flag, help=help_, **kw)
            continue
        if typing.get_origin(tp) is list:
            kw["nargs"] = "+"
            tp = typing.get_args(tp)[0]
        kw["type"] = tp
        kw["metavar"] = f.metadata.get("metavar") or path[-1].upper()
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
            if default is not None:
                help_ = f"{help_} (default {default})" if help_ else f"(default {default})"
        g.add_argument(flag, help=help_ or None, **kw)


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


def parse_dataclass_args(parser: argparse.ArgumentParser, cls: Any, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config FILE`` defaults applied (flags win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = _flatten(cls, read_config_file(known.config), f"--config {known.config}")
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


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
