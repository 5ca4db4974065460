"""Issue 28: shards written on the workers, the driver only commits; the plan listed in tasks.

Without Ray: the plan of listing jobs (folder parts, tars, Parquet) equals ``discover``'s, row
for row; the duplicate search over key buckets equals a first-occurrence dict over the whole
plan; unit segments equal a brute-force cut; the commit protocol refuses what it must.
With Ray (slow, one test): a real two-node Ray cluster on this machine (``ray start --head`` and
``ray start --address``, each node its own CPU and resource), the same rows as a run on a local
Ray, byte for byte; then a run whose encode actor is killed with SIGKILL mid-job, and its rerun,
give the uninterrupted run's files byte for byte."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, tokenize_cmd, write_image_folder

from asvr.pipeline.output.check import verify_out
from asvr.pipeline.output.commit import CommitConflict, CommitRecord, Commits, OutputError, UnitStore
from asvr.pipeline.job.plan import _part, build_plan, listing_jobs, read_dups, read_rows, unit_segments
from asvr.pipeline.job.ray_reaper import owned_processes
from asvr.pipeline.inputs.sources import SourceOptions, discover
from asvr.pipeline.output.writer import OutputDir
from asvr.core.shards import FAILURES, MANIFEST, load_codes


def _corpus(root: Path) -> list[str]:
    """A folder with own files, nested subfolders, a dotfolder, a folder link, captions, a
    non-image; a tar repeating a key of its own; a Parquet file repeating a tar key, a folder key."""
    folder = root / "folder"
    write_image_folder(folder, 7)  # d0/, d1/, d2/
    (folder / "top.jpg").write_bytes(image_bytes(40))
    (folder / "top.txt").write_text("top caption")
    (folder / "notes.md").write_text("not an image")
    (folder / "d1" / "deep").mkdir()
    (folder / "d1" / "deep" / "x.png").write_bytes(image_bytes(41, fmt="PNG"))
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "h.jpg").write_bytes(image_bytes(42))
    (folder / "link").symlink_to(folder / "d0")
    with tarfile.open(root / "a.tar", "w") as tar:
        for name, seed in (("p0.jpg", 50), ("t/a.jpg", 51), ("t/a.png", 52), ("top.jpg", 53)):
            data = image_bytes(seed)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    keys = ["p0", "t/a", "d0/img_00000.jpg"]
    pq.write_table(
        pa.table({"key": keys, "image": [image_bytes(60 + i) for i in range(3)]}),
        root / "b.parquet",
        row_group_size=2,
    )
    return [str(folder), str(root / "a.tar"), str(root / "b.parquet")]


def _plan_table(plan) -> pa.Table:
    return pa.concat_tables([read_rows(plan.folder, j.index, 0, n) for j, n in zip(plan.jobs, plan.rows) if n])


def test_listing_jobs_give_discovers_plan_and_its_duplicates(tmp_path):
    inputs = _corpus(tmp_path)
    ref, ref_inputs = discover(inputs, SourceOptions())
    jobs, described = listing_jobs(inputs, SourceOptions())
    assert described == ref_inputs
    assert [j.part for j in jobs[:4]] == ["", "d0", "d1", "d2"] and len(jobs) == 6  # folder parts + tar + parquet
    plan = build_plan(jobs, SourceOptions(), tmp_path / "plan", resume=False, ensure_ray=None)
    assert _plan_table(plan).equals(ref)
    assert plan.total == ref.num_rows and (tmp_path / "plan" / "plan.json").exists()

    # duplicates: a later row whose key was seen earlier in plan order (ignored rows never count)
    keys, sources, kinds = (ref.column(c).to_pylist() for c in ("key", "source", "kind"))
    first: dict[str, int] = {}
    expect = {}
    for i, k in enumerate(keys):
        if kinds[i] == "ignored":
            continue
        j = first.setdefault(k, i)
        if j != i:
            expect[i] = sources[j]
    assert len(expect) == 4  # t/a.png in the tar; p0, t/a, d0/img_00000.jpg in the Parquet file
    starts = plan.starts()
    found = {}
    for (job, row), src in read_dups(plan.folder, unit_segments(starts, 0, plan.total)).items():
        found[int(starts[job]) + row] = src
    assert found == expect and plan.duplicates == 4

    # a resumed listing reuses every finished job; a changed input is listed again
    again = build_plan(jobs, SourceOptions(), tmp_path / "plan", resume=True, ensure_ray=None)
    assert again.reused == len(jobs) and again.rows == plan.rows
    (tmp_path / "plan" / "plan.json").unlink()
    _part(tmp_path / "plan", 5, "json").write_text("{}")  # the Parquet job's record lost: relist it only
    again = build_plan(jobs, SourceOptions(), tmp_path / "plan", resume=True, ensure_ray=None)
    assert again.reused == len(jobs) - 1 and _plan_table(again).equals(ref)


def test_unit_rows_are_read_from_the_row_groups_they_lie_in(tmp_path):
    t = pa.table({"x": list(range(10))})
    pq.write_table(t, _part(tmp_path, 0, "parquet"), row_group_size=3)
    for a in range(10):
        for b in range(a + 1, 11):
            assert read_rows(str(tmp_path), 0, a, b).column("x").to_pylist() == list(range(a, b))


def test_unit_segments_cut_like_slicing_the_whole_plan():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = rng.integers(0, 6, rng.integers(1, 8))
        starts = np.concatenate([[0], np.cumsum(rows)])
        whole = [(j, r) for j, n in enumerate(rows) for r in range(n)]
        for size in (1, 2, 5):
            for lo in range(0, len(whole), size):
                got = [(j, r) for j, a, b in unit_segments(starts, lo, min(lo + size, len(whole))) for r in range(a, b)]
                assert got == whole[lo : lo + size]


def test_commit_protocol(tmp_path):
    store = UnitStore(str(tmp_path), "part-", ".bin")
    store.units_dir.mkdir()

    def write(path):
        path.write_bytes(b"abc")
        return "sha-abc"

    r = store.commit(3, "h", 1, write, [{"key": "k"}], {"seen": 2})
    assert r == CommitRecord(3, "h", "part-00003.bin", 1, "sha-abc", 3, [{"key": "k"}], {"seen": 2})
    assert store.done(3, "h") == r and store.done(3, "other") is None
    (tmp_path / "part-00003.bin").write_bytes(b"abcd")  # a shard of another size: not done
    assert store.done(3, "h") is None
    r0 = store.commit(3, "h", 0, write, [], {})  # no rows: the stale shard goes
    assert not (tmp_path / "part-00003.bin").exists() and store.done(3, "h") == r0

    c = Commits(4)
    assert c.add(r) and not c.add(CommitRecord.from_json(r.to_json()))  # a retried block: same record
    with pytest.raises(CommitConflict):
        c.add(r0)
    with pytest.raises(CommitConflict):
        c.add(CommitRecord(4, "h", None, 0, None, 0))
    with pytest.raises(OutputError, match="3 of 4 units were not committed"):
        c.ordered()

    # a worker killed mid-shard leaves a temp file: never a shard, swept when OUT is opened
    out = OutputDir(tmp_path / "out", {"format": "parquet", "fingerprint": "f" * 64})
    out.close()
    (tmp_path / "out" / ".part-00000.parquet.tmp-abc").write_bytes(b"half")
    OutputDir(tmp_path / "out", {"format": "parquet", "fingerprint": "f" * 64}).close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", ".units"]


# --------------------------------------------------------------------------- a two-node cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(*names: str) -> list[str]:
    return [f"--{n}={_free_port()}" for n in names]


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node, 1 CPU each, every port free-picked (other Rays run on this machine);
    each process carries a token in its environment, and exactly those are killed at the end."""
    token = f"i28-{os.getpid()}-{time.time_ns()}"
    env = dict(os.environ, ASVR_RAY_OWNER=token, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="r28", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        subprocess.run(
            [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", '--resources={"node_a": 1}']
            + [f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"]
            + _ports("dashboard-port", *NODE_PORTS),
            env=env,
            check=True,
            capture_output=True,
        )
        address = f"127.0.0.1:{port}"
        subprocess.run(
            [ray_bin, "start", f"--address={address}", "--num-cpus=1", '--resources={"node_b": 1}']
            + ["--disable-usage-stats"]
            + _ports(*NODE_PORTS),
            env=env,
            check=True,
            capture_output=True,
        )
        yield address, env, token
    finally:
        for pid in owned_processes(token):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _files(out: Path) -> dict[str, bytes]:
    """Every visible file of OUT (shards, manifest, failures), by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.mark.slow
def test_two_node_cluster_equals_local_run_and_survives_a_killed_worker(tmp_path, tiny_tokenizer_dir, cluster):
    address, env, token = cluster
    imgs = tmp_path / "imgs"
    write_image_folder(imgs, 24)
    (imgs / "d1" / "broken.jpg").write_bytes(b"not a jpeg")  # a failure row inside some unit
    (imgs / "readme.txt").write_text("not an image")  # an ignored row
    args = ("--shard-size", "2", "--batch-size", "2")

    def run(out, *extra, check=True):
        r = subprocess.run(
            tokenize_cmd(imgs, tiny_tokenizer_dir, out, *args, *extra), env=env, capture_output=True, text=True
        )
        assert not check or r.returncode == 0, r.stderr[-3000:]
        return r

    local = tmp_path / "local"
    run(local, "--num-cpus", "2")  # its own local Ray
    on_cluster = tmp_path / "cluster"
    run(on_cluster, "--ray-address", address)
    assert _files(on_cluster) == _files(local)
    m = json.loads((local / MANIFEST).read_text())
    assert m["complete"] and len(m["shards"]) == 13 and m["counts"]["failed"] == 1 and m["counts"]["ignored"] == 1
    assert set(load_codes(local)[1]) == {
        str(p.relative_to(imgs)) for p in imgs.rglob("img_*.jpg")
    }  # against the folder itself
    assert verify_out(on_cluster).ok

    # kill -9 of the encode actor's worker process while units are being written
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        tokenize_cmd(imgs, tiny_tokenizer_dir, killed, *args, "--ray-address", address),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    victim = None
    try:
        deadline = time.time() + 240
        while victim is None and time.time() < deadline and proc.poll() is None:
            if list(killed.glob("part-*.parquet")):
                for pid in owned_processes(token):
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"MapWorker(MapBatches(UnitEncodeWriter))" in cmd:
                        os.kill(pid, signal.SIGKILL)
                        victim = pid
                        break
            time.sleep(0.02)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert victim is not None, "the encode actor was never seen mid-job; nothing was tested"
    # Ray may have restarted the actor and redone its unit (the run then completes), or the run
    # failed: either way the rerun must end with the uninterrupted run's files, byte for byte.
    run(killed, "--ray-address", address)
    assert _files(killed) == _files(on_cluster)
    assert not list(killed.glob(".*.tmp-*")) and not list((killed / ".units").glob(".*.tmp-*"))
    assert pq.read_table(killed / FAILURES).equals(pq.read_table(local / FAILURES))
    assert verify_out(killed).ok
