"""Issue 28: rows/s of ``asvr-pipeline tokenize`` before/after, interleaved (before, after, after,
before, ...) so that a shared machine's changing load falls on both sides alike; run after
``pipeline_cluster_commit.py`` (its work folder: corpus of 5000 images, tokenizer).

Usage: .venv/bin/python bench/pipeline_cluster_commit_abab.py [REPS]  (default 2)
"""

import os
import re
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_cluster_commit as b  # noqa: E402
from asvr.pipeline.job.ray_reaper import owned_processes  # noqa: E402

work = Path("/tmp/asvr_bench_i28")
tok, corpus = work / "tok", work / "imgs5000"
env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
env.pop("RAY_ADDRESS", None)
pys = {"before": "/work/before28/.venv/bin/python", "after": sys.executable}
token = f"abab-{os.getpid()}"
heads = {n: b.start_head(p, dict(env, ASVR_RAY_OWNER=f"{token}-{n}")) for n, p in pys.items()}
try:
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        for name in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            out = work / f"abab-{name}"
            cmd = [
                pys[name],
                "-m",
                "asvr.pipeline.cli",
                "tokenize",
                str(corpus),
                "--tokenizer",
                str(tok),
                "--out",
                str(out),
                "--overwrite",
                "--no-progress",
                "--ray-address",
                heads[name],
                "--shard-size",
                "1000",
                "--batch-size",
                "64",
            ]
            shutil.rmtree(out, ignore_errors=True)
            res, so, se = b.run_measured(cmd, env, watch=out)
            st = b.steady_state(res.pop("samples"), 1000)
            m = re.search(r"([\d.]+) img/s", so)
            print(
                f"rep {rep} {name}: {m.group(1) if m else '?'} img/s, wall {res['wall_s']:.1f}s, driver CPU {res['cpu_s']:.2f}s, "
                f"stream CPU {st.get('stream_cpu_s', float('nan')):.2f}s/{st.get('stream_rows')} rows, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
finally:
    for n in heads:
        for pid in owned_processes(f"{token}-{n}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
