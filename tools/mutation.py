"""``make mutation``: mutmut over the core modules, one module at a time.

The packages are installed as ``asvr.tokenizer`` etc. from top-level folders
(``tokenizer/``, ``core/``... per pyproject's ``package-dir``), a layout mutmut cannot map (it names mutants by file path
and puts ``mutants/`` first on ``sys.path``).  So each target runs in a staging
copy, ``.mutation/<target>/``, laid out as the installed package (``asvr/...``,
``tests/``, ``pyproject.toml`` with the ``[tool.mutmut]`` settings of this
project plus the target's file and its fast test selection, both read from
``[tool.asvr.mutation.targets]`` in pyproject.toml).  The staging copy's
``asvr/`` is found on ``sys.path`` before the editable install.

    python tools/mutation.py                 # every target
    python tools/mutation.py quantizer       # one target
    python tools/mutation.py --results quantizer   # print the survivors again
    python tools/mutation.py templates --drop-tests tests/test_templates_24.py   # a "before" score
    python tools/mutation.py templates --rerun-survivors   # survivors again, with today's tests

Each target prints ``killed/total`` and its surviving mutants (timed-out mutants
are run once more alone: :func:`recheck_timeouts`); the triage of
the survivors (equivalent ones with a reason) is in docs/TESTING.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def packages() -> dict[str, str]:
    """``asvr.<name>`` -> its folder, from pyproject's ``package-dir`` (core/, demo/... included):
    the staging copy holds every package the tests import, laid out as installed."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = cfg["tool"]["setuptools"]["package-dir"]
    return {name.split(".", 1)[1]: folder for name, folder in dirs.items() if name.startswith("asvr.")}


def missing_files(targets: dict) -> list[str]:
    """Target files named in pyproject.toml that no longer exist (a module moved or split)."""
    return [f"{n}: {f}" for n, t in targets.items() for f in t["files"] if not (ROOT / f).is_file()]


def _toml_list(xs: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def stage(name: str, target: dict, base: dict, fresh: bool, drop: tuple[str, ...] = ()) -> Path:
    """The staging copy for one target (reused unless ``fresh``: mutmut caches results).
    ``drop``: test paths left out of the target's selection (a score with the tests of before)."""
    d = ROOT / ".mutation" / name
    if fresh and d.exists():
        shutil.rmtree(d)
    (d / "asvr").mkdir(parents=True, exist_ok=True)
    (d / "asvr" / "__init__.py").write_text("")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg, folder in packages().items():
        shutil.copytree(ROOT / folder, d / "asvr" / pkg, dirs_exist_ok=True, ignore=ignore)
    shutil.copytree(ROOT / "tests", d / "tests", dirs_exist_ok=True, ignore=ignore)
    opts = dict(base)
    if "timeout_constant" in target:
        # mutmut's CPU limit is (sum of the tests' call times + this) * multiplier * 2; call
        # times leave out module fixtures, which here build models (seconds of CPU each)
        opts["timeout_constant"] = float(target["timeout_constant"])
    opts.update(
        {
            "source_paths": ["asvr"],
            "only_mutate": [f"asvr/{f}" for f in target["files"]],
            "pytest_add_cli_args_test_selection": [t for t in target["tests"] if t not in drop],
        }
    )
    lines = [
        "[tool.pytest.ini_options]",
        'markers = ["slow: long tests"]',
        "addopts = \"-m 'not slow' -p no:cacheprovider\"",
        "",
        "[tool.mutmut]",
    ]
    for k, v in opts.items():
        lines.append(f"{k} = {_toml_list(v) if isinstance(v, list) else json.dumps(v)}")
    (d / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return d


def results(d: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """Counts per status and the names of the survivors and timeouts, from ``mutmut results --all``."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=d, capture_output=True, text=True
    ).stdout
    counts: dict[str, int] = {}
    survivors, timeouts = [], []
    for line in out.splitlines():
        if ":" not in line:
            continue
        mutant, status = (s.strip() for s in line.rsplit(":", 1))
        counts[status] = counts.get(status, 0) + 1
        if status in ("survived", "no tests"):  # "no tests": new tests may reach it (--rerun-survivors)
            survivors.append(mutant)
        elif status == "timeout":
            timeouts.append(mutant)
    return counts, survivors, timeouts


def recheck_timeouts(d: Path, tests: list[str], names: list[str], env: dict) -> list[str]:
    """The timed-out mutants whose tests *pass* when run alone, in a plain process.

    mutmut counts a timeout as a kill, but its forked children can hang at exit once
    DeepSpeed has set up a gloo group (the checkpoint target: 8 of its 22 timeouts
    passed every test when run directly).  So each timeout is run once more with
    ``MUTANT_UNDER_TEST`` set; only a failing (or really hanging) run counts as killed."""
    passing = []
    for name in names:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *tests]
        run_env = dict(env, MUTANT_UNDER_TEST=name, PYTHONPATH=str(d / "mutants"))
        try:
            r = subprocess.run(cmd, cwd=d / "mutants", env=run_env, capture_output=True, timeout=600)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0:
            passing.append(name)
    return passing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", help="target names (default: all, see pyproject.toml)")
    ap.add_argument("--results", action="store_true", help="only print the results of the last run")
    ap.add_argument("--fresh", action="store_true", help="drop the cached results of earlier runs")
    ap.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument(
        "--drop-tests", nargs="+", default=[], metavar="PATH", help="leave these test files out (a 'before' score)"
    )
    ap.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="run only the last run's survivors (and mutants without tests) again, with today's tests"
        " (mutmut keeps every other result)",
    )
    args = ap.parse_args()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    base = dict(cfg.get("mutmut", {}))
    targets = cfg["asvr"]["mutation"]["targets"]
    names = args.targets or list(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        print(f"error: unknown target(s) {unknown}; known: {sorted(targets)}", file=sys.stderr)
        return 2
    gone = missing_files({n: targets[n] for n in names})
    if gone:
        print(f"error: target files not found (moved or split?): {gone}", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    summary = []
    for name in names:
        drop = tuple(args.drop_tests)
        d = stage(name, targets[name], base, args.fresh, drop) if not args.results else ROOT / ".mutation" / name
        if not args.results:
            print(f"== mutation: {name} ({', '.join(targets[name]['files'])})", flush=True)
            again = results(d)[1] if args.rerun_survivors else []
            if not args.rerun_survivors or again:
                subprocess.run(
                    [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *again],
                    cwd=d,
                    env=env,
                    check=False,
                )
        counts, survivors, timeouts = results(d)
        hidden = recheck_timeouts(d, [t for t in targets[name]["tests"] if t not in drop], timeouts, env)
        total = sum(counts.values())
        killed = counts.get("killed", 0) + counts.get("timeout", 0) - len(hidden)
        summary.append(
            f"{name}: {killed}/{total} killed ({100 * killed / max(total, 1):.0f}%)  {counts}"
            + (f", {len(hidden)} timeouts pass when run alone (counted as survivors)" if hidden else "")
        )
        for s in survivors:
            print(f"  survived: {s}")  # or had no test
        for s in hidden:
            print(f"  survived (timed out under mutmut, passes alone): {s}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
