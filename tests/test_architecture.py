"""The layering of docs/ARCHITECTURE.md that import-linter cannot see: what an import costs.

The shared core (``asvr.core``: errors, atomic writes, registry, the CLI generator and the
contracts as data types, the shard reader among them) is read by every Ray worker and by
tools that never train; importing it must not import torch or Ray.  Checked in a fresh
interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

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
