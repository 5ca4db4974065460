"""The layering of docs/ARCHITECTURE.md that import-linter cannot see: what an import costs.

The shared core (``asvr.core``: errors, atomic writes, registry, the CLI generator and the
contracts as data types, the shard reader among them) is read by every Ray worker and by
tools that never train; importing it must not import torch or Ray.  Checked in a fresh
interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import asvr.core

CORE_MODULES = sorted(f"asvr.core.{m.name}" for m in pkgutil.iter_modules(asvr.core.__path__))
PACKAGES = ["asvr.tokenizer", "asvr.pipeline", "asvr.train", "asvr.eval", "asvr.demo"]


def _loaded_after(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_the_core_lists_the_contract_modules():
    """The contracts named in docs/ARCHITECTURE.md live in the core (guards the list below)."""
    for name in ["errors", "atomic", "registry", "paths", "config_cli", "shards", "spec", "llava_json"]:
        assert f"asvr.core.{name}" in CORE_MODULES


@pytest.mark.parametrize("modules", [CORE_MODULES, PACKAGES], ids=["every core module", "the package roots"])
def test_importing_never_loads_torch_or_ray(modules):
    loaded = _loaded_after(modules)
    assert "asvr" in loaded  # the import happened
    assert not {"torch", "ray", "transformers", "deepspeed", "faiss"} & loaded, sorted(loaded)


def test_the_probe_sees_torch_when_a_torch_module_is_imported():
    """The check above can fail: the same probe on the tokenizer model reports torch."""
    assert "torch" in _loaded_after(["asvr.tokenizer.model"])


# --------------------------------------------------------------------------- size budget
# ruff's C901 / PLR0912 / PLR0915 (pyproject.toml) bound a function's complexity and statements;
# no ruff rule bounds lines.  A library function over 80 lines or a library file over 400 lines
# fails here, unless listed below with the reason a split would hurt (or who is splitting it).
REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["core", "tokenizer", "pipeline", "train", "eval", "demo"]
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400
LONG_FUNCTIONS = {
    # one Triton kernel is one compiled unit over one register tile; @triton.jit helpers would
    # scatter the loads and stores that must be read together to check the masks
    "tokenizer/rvq/fused_triton.py:_fused": "a single Triton kernel",
}
LONG_FILES: dict[str, str] = {}  # may only shrink: none left over 400 lines


def _library_files() -> list[Path]:
    return sorted(p for d in LIBRARY for p in (REPO / d).rglob("*.py"))


def _function_lengths(path: Path) -> dict[str, int]:
    """Lines of the longest function of each name in ``path`` (``def`` to its last line; methods
    and nested functions too)."""
    lengths: dict[str, int] = {}
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lengths[n.name] = max(lengths.get(n.name, 0), n.end_lineno - n.lineno + 1)  # type: ignore[operator]
    return lengths


def _long_functions() -> dict[str, int]:
    return {
        f"{path.relative_to(REPO).as_posix()}:{name}": n
        for path in _library_files()
        for name, n in _function_lengths(path).items()
        if n > MAX_FUNCTION_LINES
    }


def _long_files() -> dict[str, int]:
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in _library_files()}
    return {name: n for name, n in sizes.items() if n > MAX_FILE_LINES}


def _check_budget(measured: dict[str, int], allowed: dict[str, str], limit: int, what: str, table: str) -> None:
    over = {name: n for name, n in measured.items() if name not in allowed}
    assert not over, f"library {what} over {limit} lines (split them): {over}"
    stale = sorted(set(allowed) - set(measured))
    assert not stale, f"no longer over {limit} lines, remove from {table}: {stale}"


def test_library_functions_stay_under_the_line_budget():
    _check_budget(_long_functions(), LONG_FUNCTIONS, MAX_FUNCTION_LINES, "functions", "LONG_FUNCTIONS")


def test_library_files_stay_under_the_line_budget():
    _check_budget(_long_files(), LONG_FILES, MAX_FILE_LINES, "files", "LONG_FILES")


def test_the_budget_probe_sees_a_long_function(tmp_path):
    """The walk above can fail: a generated 81-line function is over the budget, an 80-line one not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    short = "    def run(self):\n        pass\n"
    src = f"def ok():\n{body}\n\ndef long():\n{body}    x = 0\n\n\nclass A:\n{short}"
    (tmp_path / "m.py").write_text(src.replace("def long", "def run", 1))
    # the short method of the same name does not hide the long function
    assert _function_lengths(tmp_path / "m.py") == {"ok": 80, "run": 81}
