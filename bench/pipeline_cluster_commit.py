"""Issue 28: the driver's cost with every row through it (main) vs commit records only (this tree).

Measured in one run, on the same Ray (``ray start --head``, 2 CPUs, joined with
``--ray-address`` so the driver is a process of its own whose CPU and peak RSS ``os.wait4``
reports), the same corpus and the same tokenizer:

1. driver CPU seconds per 10k rows: ``asvr-pipeline tokenize`` of N1 and N2 images, before
   (``--before-python``: a checkout of main, default ``/work/main/.venv/bin/python``) and after
   (this interpreter); the marginal cost ``(cpu(N2) - cpu(N1)) / (N2 - N1)`` leaves out Ray's
   start-up, the tokenizer load and the planning that every run pays once.  Also rows/s end to end
   and a check that both write the same files (manifest equal, sha256s included);
2. driver memory and time to list 1M inputs: 8 Parquet files of 125k rows, ``discover`` in the
   driver (before) vs listing jobs in Ray tasks + the duplicate search (after), each in a fresh
   process (wall time, peak RSS, CPU of that process);
3. object-store bytes that reach the driver per row: the Arrow size of the encode actor's output
   block per row (before: codes + per-row fields; after: one commit record per unit);
4. on paper: rows/s a cluster can sustain before the driver's commit loop is the limit.

The tokenizer is at the reference code size (27x27 grid, depth 8: 5832 codes per row, as
SigLIP-so400m + DualToken's codebooks) with a tiny random SigLIP tower (2 layers, width 16,
patch 2 on 54 px) and K=256, so the encode is cheap and the driver's share shows.

Usage: .venv/bin/python bench/pipeline_cluster_commit.py [--n1 1500 --n2 4500 --listing-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_image  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tokenizer(out: Path) -> Path:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

    from asvr.tokenizer.encoders.base import default_encoder_spec

    if (out / "tokenizer.json").exists():
        return out
    torch.manual_seed(0)
    tower = out.parent / "tower"
    cfg = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=54, patch_size=2
    )
    SiglipVisionModel(cfg).eval().save_pretrained(tower)
    enc = default_encoder_spec("siglip", str(tower), feature_layer=-1)
    spec = TokenizerSpec(
        encoder=enc, preprocess="square", grid=(27, 27), dim=16, depth=8, codebook_size=256, shared_codebook=False
    )
    save_artifact(out, spec, torch.randn(8, 256, 16) * torch.logspace(0, -2, 8)[:, None, None])
    return out


def make_corpus(folder: Path, n: int) -> Path:
    for i in range(n):
        p = folder / f"d{i % 10}" / f"img_{i:06d}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            make_image(i, (64, 48)).save(p, "JPEG", quality=90)
    return folder


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + sys) of process ``pid`` so far, from ``/proc/PID/stat``; None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steady_state(samples: list[tuple[float, float, int]], shard: int) -> dict:
    """The driver's CPU while shards stream in: from the first shard file's appearance to the
    last one's, per row committed in between (start-up, listing, the tokenizer load and the final
    manifest left out, whichever side pays them)."""
    first = next((s for s in samples if s[2] >= 1), None)
    n_last = samples[-1][2] if samples else 0
    last = next((s for s in samples if s[2] >= n_last), None)
    if first is None or last is None or last[2] <= first[2]:
        return {}
    rows = (last[2] - first[2]) * shard
    return {
        "stream_rows": rows,
        "stream_cpu_s": last[1] - first[1],
        "stream_wall_s": last[0] - first[0],
        "cpu_at_first_shard_s": first[1],
        "wall_at_first_shard_s": first[0],
        "cpu_at_last_shard_s": last[1],
    }


def run_measured(cmd: list[str], env: dict, watch: Path | None = None) -> tuple[dict, str, str]:
    """Run ``cmd``; its wall time, its own CPU seconds (user+sys) and peak RSS (``wait4``); with
    ``watch`` (the output folder), also (time, driver CPU, shard files) sampled every 20 ms."""
    samples: list[tuple[float, float, int]] = []
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe)
        pid, status, ru = os.wait4(p.pid, os.WNOHANG if watch is not None else 0)
        while pid == 0:  # watching: the child runs
            cpu = proc_cpu(p.pid)
            n = len(list(watch.glob("part-*.parquet"))) if watch is not None and watch.is_dir() else 0
            if cpu is not None and (not samples or n != samples[-1][2]):
                samples.append((time.perf_counter() - t0, cpu, n))
            time.sleep(0.02)
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(), fe.read().decode()
    res = {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024, "rc": p.returncode}
    res["samples"] = samples
    return res, out, err


LIST_BEFORE = """
import sys, time
try:
    from asvr.pipeline.inputs.sources import SourceOptions, discover
except ImportError:  # a checkout from before issue 21's layout
    from asvr.pipeline.sources import SourceOptions, discover
t = time.perf_counter()
plan, _ = discover(sys.argv[1:], SourceOptions())
print(plan.num_rows, time.perf_counter() - t)
"""

LIST_AFTER = """
import sys, time, os
import ray
t = time.perf_counter()
ray.init(address=os.environ["BENCH_RAY"], logging_level="ERROR", log_to_driver=False)
t_init = time.perf_counter() - t
from asvr.pipeline.job.plan import build_plan, listing_jobs
from asvr.pipeline.inputs.sources import SourceOptions
t = time.perf_counter()
jobs, _ = listing_jobs(sys.argv[2:], SourceOptions())
plan = build_plan(jobs, SourceOptions(), sys.argv[1], resume=False, ensure_ray=lambda: None)
print(plan.total, time.perf_counter() - t, t_init)
"""


EXECUTOR = """
import os, resource, sys, time
import ray, ray.data
ray.init(address=os.environ["BENCH_RAY"], logging_level="ERROR", log_to_driver=False)
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
ctx.target_max_block_size = None
class Same:
    def __call__(self, b):
        return b
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = []
for n in map(int, sys.argv[1:]):
    c0, t0 = cpu(), time.perf_counter()
    ds = ray.data.range(n, override_num_blocks=n)
    ds = ds.map_batches(lambda b: b, batch_size=None, num_cpus=1, memory=512 * 2**20)  # not fused: as decode
    ds = ds.map_batches(Same, batch_size=None, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    sum(len(b["id"]) for b in ds.iter_batches(batch_size=None))
    out += [n, cpu() - c0, time.perf_counter() - t0]
print(*out)
"""


def listing_corpus(folder: Path, rows: int, files: int = 8) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = rows // files
    for f in range(files):
        p = folder / f"list-{f:02d}.parquet"
        if not p.exists():
            keys = pa.array([f"f{f}/img_{i:07d}.jpg" for i in range(per)])
            pq.write_table(pa.table({"key": keys, "image": pa.array([b"x"] * per, pa.binary())}), p)
        paths.append(str(p))
    return paths


def bytes_per_row_before(n_codes: int) -> float:
    """The Arrow size per row of main's encode output block (what iter_batches ships to the driver):
    idx, ok, stage, error, sha256, caption, width, height, t_read, t_decode, codes, t_encode."""
    import pyarrow as pa

    n = 1000
    t = pa.table(
        {
            "idx": np.arange(n, dtype=np.int64),
            "ok": np.ones(n, bool),
            "stage": pa.array([None] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
            "sha256": ["0" * 64] * n,
            "caption": pa.array([None] * n, pa.string()),
            "width": np.zeros(n, np.int32),
            "height": np.zeros(n, np.int32),
            "t_read": np.zeros(n),
            "t_decode": np.zeros(n),
            "codes": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * n_codes, np.uint16)), n_codes),
            "t_encode": np.zeros(n),
        }
    )
    return t.nbytes / n


def bytes_per_row_after(out: Path) -> float:
    """The Arrow size of the records the driver received (one row per unit), per image."""
    import pyarrow as pa

    from asvr.pipeline.output.commit import CommitRecord

    recs = [CommitRecord.from_json(p.read_text()) for p in sorted((out / ".units").glob("unit-*.json"))]
    n = len(recs)
    t = pa.table(
        {
            "unit": np.arange(n),
            "record": [r.to_json() for r in recs],
            "images": np.zeros(n, np.int64),
            "skipped": np.zeros(n, bool),
            **{k: np.zeros(n) for k in ("t_read", "t_decode", "t_encode", "t_write")},
        }
    )
    return t.nbytes / sum(r.counts["seen"] + r.counts.get("ignored", 0) for r in recs)


def commit_loop_cost(records: int = 20000, shard: int = 1000) -> float:
    """Seconds per record of the driver's loop body: parse the JSON record, keep it."""
    from asvr.pipeline.output.commit import CommitRecord, Commits

    text = CommitRecord(0, "a" * 64, "part-00000.parquet", shard, "b" * 64, 12345678, [], {"seen": shard}).to_json()
    c = Commits(records)
    t = time.perf_counter()
    for u in range(records):
        r = CommitRecord.from_json(text)
        r.unit = u
        c.add(r)
    return (time.perf_counter() - t) / records


def start_head(python: str, env: dict) -> str:
    """``ray start --head`` (2 CPUs, free ports, no dashboard) with ``python``'s Ray; its address."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rb28", dir="/tmp")
    names = (
        "dashboard-port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    ports = [f"--{n}={free_port()}" for n in names]
    subprocess.run(
        [str(Path(python).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}"]
        + ["--include-dashboard=false", "--disable-usage-stats", *ports],
        env=env,
        check=True,
        capture_output=True,
    )
    return f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n1", type=int, default=1500)
    ap.add_argument("--n2", type=int, default=4500)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--listing-rows", type=int, default=1_000_000)
    ap.add_argument("--before-python", default="/work/before28/.venv/bin/python")
    ap.add_argument("--work", default="/tmp/asvr_bench_i28")
    ap.add_argument("--results", default=str(ROOT / "bench/results/pipeline_cluster_commit_cpu_2core.txt"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(work / "tok")
    corpora = {n: make_corpus(work / f"imgs{n}", n) for n in (args.n1, args.n2)}
    lines = [f"issue 28 bench, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, tokenizer 27x27x8 K=256"]

    from asvr.pipeline.job.ray_reaper import owned_processes

    token = f"bench28-{os.getpid()}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    pythons = {"before": args.before_python, "after": sys.executable}
    # one head per side, started by that side's interpreter: the workers import the side's own code
    # (the two trees may lay the package out differently)
    heads = {name: start_head(py, dict(env, ASVR_RAY_OWNER=f"{token}-{name}")) for name, py in pythons.items()}
    env["BENCH_RAY"] = heads["after"]
    results: dict = {}
    try:
        # ---------------------------------------------------------------- 1. driver CPU per row
        for name, py in pythons.items():
            address = heads[name]
            for n, corpus in corpora.items():
                out = work / f"out-{name}-{n}"
                cmd = [py, "-m", "asvr.pipeline.cli", "tokenize", str(corpus), "--tokenizer", str(tok)]
                cmd += ["--out", str(out), "--overwrite", "--no-progress", "--ray-address", address]
                cmd += ["--shard-size", str(args.shard_size), "--batch-size", "64"]
                shutil.rmtree(out, ignore_errors=True)  # the shard files counted must be this run's
                res, so, se = run_measured(cmd, env, watch=out)
                res.update(steady_state(res.pop("samples"), args.shard_size))
                if res["rc"] != 0:
                    raise SystemExit(f"{name} {n}: rc {res['rc']}\n{se[-3000:]}")
                m = re.search(r"(\d+) images in ([\d.]+)s = ([\d.]+) img/s", so)
                res["img_s"] = float(m.group(3)) if m else float("nan")
                results[(name, n)] = res
                lines.append(
                    f"{name:6s} N={n}: wall {res['wall_s']:.1f}s, driver CPU {res['cpu_s']:.2f}s, "
                    f"driver peak RSS {res['maxrss_mb']:.0f} MB, {res['img_s']:.1f} img/s (summary line), "
                    f"load after {os.getloadavg()[0]:.1f}"
                )
        same = all(
            (work / f"out-before-{n}" / "manifest.json").read_text()
            == (work / f"out-after-{n}" / "manifest.json").read_text()
            for n in corpora
        )
        lines.append(f"manifests (shard sha256s included) equal before/after: {same}")
        per10k = {}
        for name in ("before", "after"):
            d_cpu = results[(name, args.n2)]["cpu_s"] - results[(name, args.n1)]["cpu_s"]
            per10k[name] = d_cpu / (args.n2 - args.n1) * 10_000
            lines.append(f"{name:6s}: marginal driver CPU {per10k[name]:.2f} s per 10k rows")
        lines.append(
            f"RATIO driver CPU per row after/before = {per10k['after'] / per10k['before']:.3f} (target <= 0.1)"
        )
        stream = {}
        for name in ("before", "after"):
            r = results[(name, args.n2)]
            if "stream_rows" in r:
                stream[name] = r["stream_cpu_s"] / r["stream_rows"] * 10_000
                lines.append(
                    f"{name:6s}: driver CPU while shards stream in (first to last shard file, N={args.n2}): "
                    f"{r['stream_cpu_s']:.2f}s over {r['stream_rows']} rows in {r['stream_wall_s']:.1f}s wall = "
                    f"{stream[name]:.2f} s per 10k rows ({r['stream_cpu_s'] / r['stream_wall_s'] * 100:.1f}% of a core)"
                )
                lines.append(
                    f"{name:6s}: driver CPU up to the first shard {r['cpu_at_first_shard_s']:.2f}s (at "
                    f"{r['wall_at_first_shard_s']:.1f}s wall), after the last {r['cpu_s'] - r['cpu_at_last_shard_s']:.2f}s"
                )
        if len(stream) == 2:
            lines.append(
                f"RATIO steady-state driver CPU per row after/before = {stream['after'] / stream['before']:.3f} "
                "(target <= 0.1)"
            )
        ips = {k: results[(k, args.n2)]["img_s"] for k in ("before", "after")}
        lines.append(f"RATIO rows/s after/before (N={args.n2}) = {ips['after'] / ips['before']:.3f} (target >= 1)")

        # ---------------------------------------------------------------- 2. listing 1M inputs
        paths = listing_corpus(work / "listing", args.listing_rows)
        res_b, so, se = run_measured([args.before_python, "-c", LIST_BEFORE, *paths], env)
        assert res_b["rc"] == 0, se[-2000:]
        rows_b, t_b = so.split()[:2]
        res_a, so, se = run_measured([sys.executable, "-c", LIST_AFTER, str(work / "listing-plan"), *paths], env)
        assert res_a["rc"] == 0, se[-2000:]
        rows_a, t_a, t_init = so.split()[:3]
        lines.append(
            f"list {rows_b} rows, before (discover in the driver): {float(t_b):.1f}s, peak RSS "
            f"{res_b['maxrss_mb']:.0f} MB, CPU {res_b['cpu_s']:.1f}s"
        )
        lines.append(
            f"list {rows_a} rows, after (8 listing tasks + 16 bucket tasks + merge): {float(t_a):.1f}s "
            f"(+{float(t_init):.1f}s ray.init), driver peak RSS {res_a['maxrss_mb']:.0f} MB, driver CPU {res_a['cpu_s']:.1f}s"
        )

        # ---------------------------------------------------------------- 3. bytes to the driver
        b_before = bytes_per_row_before(27 * 27 * 8)
        b_after = bytes_per_row_after(work / f"out-after-{args.n2}")
        lines.append(
            f"object-store bytes to the driver per row: before {b_before:.0f}, after {b_after:.2f} "
            f"(shard size {args.shard_size})"
        )

        # ---------------------------------------------------------------- 4. Ray Data's cost per block
        # what the coordinator task (after) or the driver (before) spends scheduling one block through
        # the same two operators, with identity functions: the per-unit cost wherever Ray Data runs
        res_x, so, se = run_measured([sys.executable, "-c", EXECUTOR, "50", "450"], env)
        assert res_x["rc"] == 0, se[-2000:]
        n_a, c_a, w_a, n_b, c_b, w_b = map(float, so.split())
        per_block = (c_b - c_a) / (n_b - n_a)
        lines.append(
            f"Ray Data executor, identity decode task + actor, one block per unit: {per_block * 1e3:.1f} ms CPU "
            f"per block in the process iterating ({n_b:.0f} blocks in {w_b:.1f}s wall)"
        )

        # ---------------------------------------------------------------- 5. on paper
        loop = commit_loop_cost()
        units_n2 = -(-args.n2 // args.shard_size)
        units_n1 = -(-args.n1 // args.shard_size)
        cpu_unit = (results[("after", args.n2)]["cpu_s"] - results[("after", args.n1)]["cpu_s"]) / (units_n2 - units_n1)
        lines.append(
            f"driver loop body per record {loop * 1e6:.1f} us; marginal driver CPU per unit (Ray Data "
            f"scheduling included) {cpu_unit * 1e3:.0f} ms"
        )
        lines.append(
            f"on paper, one driver core: before ~{10_000 / per10k['before']:.0f} rows/s (measured marginal CPU "
            f"per row); after: the driver's loop ~{1000 / loop:.0f} rows/s at --shard-size 1000, the "
            f"coordinator's Ray Data scheduling ~{1000 / per_block:.0f} rows/s (one block per unit of 1000)"
        )
    finally:
        for pid in [p for name in heads for p in owned_processes(f"{token}-{name}")]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    from asvr.core.atomic import atomic_write

    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.results, text)
    atomic_write(
        Path(args.results).with_suffix(".json"), json.dumps({f"{k[0]}-{k[1]}": v for k, v in results.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
