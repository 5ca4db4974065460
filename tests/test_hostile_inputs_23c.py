"""Issue 23, pipeline and tokenizer half, the behaviours merged without a test: sparse tar
members (GNU and PAX, written by GNU tar from files with real holes), the Parquet read limit
(``--max-read-mb``) over a huge cell, a struct ``{path}`` Parquet cell, 16-bit PNGs converted in
chunks and refused over the decode budget, LLaVA ``.jsonl`` line numbers and lone surrogates,
:class:`asvr.core.signals.StopSignals` and the Ray reaper (real subprocesses standing in
for Ray's processes).  Unit level first, then one real pipeline run (one local Ray)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes
from PIL import Image

from asvr.pipeline.output.check import verify_out
from asvr.pipeline.cli import main
from asvr.pipeline.job.ray_reaper import MARK, Reaper, owned_processes
from asvr.pipeline.inputs.sources import SourceError, SourceOptions, discover
from asvr.pipeline.job.stages import ReadDecode, decode_one
from asvr.tokenizer.preprocess import _CHUNK, ImageError, PreprocessConfig, _scaled_to_l, decode_bytes, open_image
from asvr.core.errors import run_guarded
from asvr.core.llava_json import LlavaJSONError, read_llava_records
from asvr.core.shards import FAILURES, MANIFEST, read_shard
from asvr.core.signals import StopSignals, Stopped

CFG = PreprocessConfig(image_size=32)
GNU_TAR = shutil.which("tar")
SPARSE_FORMATS = {  # GNU 'S' headers, and the three PAX GNU.sparse.* versions
    "gnu": ["--format=gnu"],
    "pax00": ["--format=pax", "--sparse-version=0.0"],
    "pax01": ["--format=pax", "--sparse-version=0.1"],
    "pax10": ["--format=pax", "--sparse-version=1.0"],
}


def _holey_bmp() -> bytes:
    """An uncompressed BMP whose bottom half (stored first) is black: 20 KB of zero bytes that a
    file with holes leaves unallocated, so GNU tar stores it as a sparse member."""
    a = np.zeros((128, 128, 3), np.uint8)
    a[:64] = np.random.default_rng(7).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "BMP")
    data = buf.getvalue()
    assert not data[4096:24576].strip(b"\0")
    return data


def _sparse_tar(root: Path, fmt: str, data: bytes) -> Path:
    """``s_<fmt>.bmp`` (a file with a hole, tarred with ``--sparse``), then a plain JPEG member,
    whose bytes a sparse member read as one span used to take."""
    if GNU_TAR is None or b"GNU tar" not in subprocess.run([GNU_TAR, "--version"], capture_output=True).stdout:
        pytest.skip("GNU tar is needed to write sparse members")
    src = root / f"src_{fmt}"
    src.mkdir(parents=True)
    with open(src / f"s_{fmt}.bmp", "wb") as f:
        f.write(data[:4096])
        f.seek(24576)  # a real hole: GNU tar only looks for sparse data in files with holes
        f.write(data[24576:])
    (src / f"after_{fmt}.jpg").write_bytes(image_bytes(90 + len(fmt)))
    tar = root / f"{fmt}.tar"
    cmd = [
        GNU_TAR,
        "-cf",
        str(tar),
        "--sparse",
        *SPARSE_FORMATS[fmt],
        "-C",
        str(src),
        f"s_{fmt}.bmp",
        f"after_{fmt}.jpg",
    ]
    subprocess.run(cmd, check=True)
    with tarfile.open(tar) as t:
        first = t.getmembers()[0]
    if not first.issparse():
        pytest.skip(f"this file system keeps no holes: {fmt}.tar holds no sparse member")
    return tar


def _decoded(inputs, opts: SourceOptions | None = None, cfg: PreprocessConfig = CFG) -> dict[str, dict]:
    plan, _ = discover([str(i) for i in inputs], opts or SourceOptions())
    batch = {k: np.asarray(v, dtype=object) for k, v in plan.to_pydict().items()}
    batch["idx"] = np.arange(plan.num_rows)
    out = ReadDecode(cfg)(batch)
    rows = plan.to_pylist()
    return {
        r["key"]: {
            "kind": r["kind"],
            "ok": bool(out["ok"][i]),
            "stage": out["stage"][i],
            "error": out["error"][i],
            "sha256": out["sha256"][i],
            "pixels": out["pixels"][i],
        }
        for i, r in enumerate(rows)
    }


# --------------------------------------------------------------------------- 1: sparse tar members
def test_sparse_tar_members_are_read_as_the_file_they_hold(tmp_path):
    data = _holey_bmp()
    tars = [_sparse_tar(tmp_path, fmt, data) for fmt in SPARSE_FORMATS]
    got = _decoded(tars)
    want_pixels = decode_one(data, CFG)[0]
    for fmt in SPARSE_FORMATS:
        s, after = got[f"s_{fmt}"], got[f"after_{fmt}"]
        assert s["kind"] == "tar-sparse" and after["kind"] == "tar", fmt
        assert s["ok"] and s["sha256"] == hashlib.sha256(data).hexdigest(), fmt  # before: bytes of the next member
        assert np.array_equal(s["pixels"], want_pixels), fmt
        jpg = image_bytes(90 + len(fmt))
        assert after["ok"] and after["sha256"] == hashlib.sha256(jpg).hexdigest(), fmt


def test_a_sparse_member_cut_short_is_a_failure_row_not_other_bytes(tmp_path):
    tar = _sparse_tar(tmp_path, "gnu", _holey_bmp())
    with tarfile.open(tar) as t:
        first = t.getmembers()[0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: first.offset_data + 4096 + 1000])  # inside its second data block
    got = _decoded([cut])
    s = got["s_gnu"]
    assert s["kind"] == "tar-sparse" and not s["ok"] and s["stage"] == "read"
    assert s["error"] == "sparse tar member is truncated: wanted 49206 bytes (unexpected end of data)"
    assert got["cut.tar#truncated"]["kind"] == "input"
    assert (
        got["cut.tar#truncated"]["error"]
        == f"{cut}: tar is truncated or corrupt after 1 members (unexpected end of data)"
    )


def test_a_sparse_member_whose_header_changed_after_listing_is_a_failure_row(tmp_path):
    data = _holey_bmp()
    tar = _sparse_tar(tmp_path, "pax10", data)
    plan, _ = discover([str(tar)], SourceOptions())
    src = tmp_path / "src_pax10"
    (src / "s_pax10.bmp").write_bytes(data)  # no holes now: the same name, written as a plain member
    subprocess.run([GNU_TAR, "-cf", str(tar), "--format=pax", "-C", str(src), "s_pax10.bmp"], check=True)
    batch = {k: np.asarray(v, dtype=object) for k, v in plan.to_pydict().items()}
    batch["idx"] = np.arange(plan.num_rows)
    out = ReadDecode(CFG)(batch)
    i = plan.column("key").to_pylist().index("s_pax10")
    assert not out["ok"][i] and out["stage"][i] == "read"
    header = plan.column("offset").to_pylist()[i]
    assert out["error"][i] == f"the tar changed since it was listed (no sparse member of 49206 bytes at {header})"


# --------------------------------------------------------------------------- 2, 3: Parquet cells
def _parquet_over_limit(path: Path, limit: int) -> tuple[Path, int]:
    """Three one-row row groups: an image, a cell just over ``limit`` (zeros: a tiny file), an image."""
    t = pa.table(
        {"key": ["p0", "huge", "p2"], "image": [image_bytes(60), bytes(limit + 50_000), image_bytes(62)]},
        schema=pa.schema([("key", pa.string()), ("image", pa.binary())]),
    )
    pq.write_table(t, path, row_group_size=1, compression="zstd")
    md = pq.ParquetFile(path).metadata.row_group(1)
    return path, md.column(1).total_uncompressed_size


def test_a_huge_parquet_cell_is_a_failure_row_never_read(tmp_path):
    limit = 2**20
    path, huge = _parquet_over_limit(tmp_path / "big.parquet", limit)
    assert path.stat().st_size < limit // 10 < limit < huge  # a small file holding a cell over the limit
    got = _decoded([path], SourceOptions(max_read_bytes=limit))
    assert got["p0"]["ok"] and got["p2"]["ok"]
    assert got["huge"]["kind"] == "error" and got["huge"]["stage"] == "read"
    assert got["huge"]["error"] == (
        f"row group 1 of column 'image' (1 rows; the reader reads a row group at once) is {huge / 2**20:.1f} MiB, "
        "more than the 1 MiB one decode task reads (--max-read-mb); write the file with smaller row groups "
        "(pyarrow row_group_size)"
    )
    assert _decoded([path], SourceOptions(max_read_bytes=2 * limit))["huge"]["kind"] == "parquet"  # under: read
    with pytest.raises(SourceError) as e:
        SourceOptions(max_read_bytes=0)
    assert str(e.value) == "--max-read-mb must be > 0"


def _struct_parquet(path: Path) -> Path:
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": image_bytes(70), "path": "a.jpg"}, {"bytes": None, "path": "photos/b.jpg"}, None]
    pq.write_table(pa.table({"key": ["sa", "sb", "sc"], "image": pa.array(cells, cell)}), path)
    return path


def test_a_struct_cell_with_a_path_and_no_bytes_is_named(tmp_path):
    got = _decoded([_struct_parquet(tmp_path / "hf.parquet")])
    assert got["sa"]["ok"] and got["sa"]["sha256"] == hashlib.sha256(image_bytes(70)).hexdigest()
    assert (got["sb"]["ok"], got["sb"]["stage"]) == (False, "read")
    assert got["sb"]["error"] == (  # before: "image cell is null"
        "image cell is a struct with path 'photos/b.jpg' but no bytes: files named by a Parquet cell are not "
        "opened; embed the image bytes in the file"
    )
    assert got["sc"]["error"] == "image cell is null"


# --------------------------------------------------------------------------- 4: 16-bit PNGs
def _png16(w: int, h: int, rows=None) -> bytes:
    """A 16-bit greyscale PNG written row by row (``rows(y) -> uint16 [w]``; zeros by default), so a
    9000x9000 one costs no 162 MB array here."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(6)
    idat = []
    zero = b"\0" + bytes(2 * w)
    for y in range(h):
        line = zero if rows is None else b"\0" + rows(y).astype(">u2").tobytes()
        idat.append(z.compress(line))
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def _gradient16(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 977 + yy * 131) % 65536).astype(np.uint16)


def test_16bit_png_is_scaled_in_chunks_like_a_whole_image_pass():
    w, h = 2000, 2100  # 4.2 Mpixels: four chunks of _CHUNK pixels, the last one partial
    arr = _gradient16(w, h)
    data = _png16(w, h, lambda y: arr[y])
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.mode == "I;16" and img.size == (w, h)
    n = w * h
    assert n > 4 * _CHUNK > 3 * _CHUNK

    def reference(im):  # the straightforward conversion: one float64 pass over the whole image
        a = np.asarray(im).astype(np.float64)
        return np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)

    tracemalloc.start()
    try:
        want = reference(img)
        _, ref_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        got = _scaled_to_l(img, lambda lo, hi: 255.0 / 65535.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.mode == "L" and np.array_equal(np.asarray(got), want)
    # numpy's share of the chunked pass: the uint16 copy, the 8-bit output, float64 temporaries of
    # one chunk; the whole-image pass needs 8 bytes per pixel per temporary
    bound = 3 * n + 4 * 8 * _CHUNK
    assert peak - base <= bound < ref_peak
    rgb = open_image(data, PreprocessConfig(image_size=32, max_decode_bytes=decode_bytes("I;16", w, h)))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.repeat(want[:, :, None], 3, axis=2))


def test_16bit_png_over_the_decode_budget_is_refused_before_decoding():
    data = _png16(9000, 9000)  # 81 Mpixels, under --max-pixels; 150 KB of PNG
    assert len(data) < 2**20
    cfg = PreprocessConfig(image_size=32, max_decode_bytes=512 * 2**20)
    need = decode_bytes("I;16", 9000, 9000)
    assert need == 81_000_000 * 8
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as e:
            open_image(data, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.reason == "decoding 9000x9000 I;16 needs about 618 MiB, more than the 512 MiB of a decode task"
    assert peak < 16 * 2**20  # only the header was read
    assert decode_bytes("RGB", 9000, 9000) < cfg.max_decode_bytes  # an 8-bit image of that size still decodes


# --------------------------------------------------------------------------- 5, 6: LLaVA JSON files
def test_a_broken_jsonl_line_is_named_by_its_real_number(tmp_path):
    recs = [
        {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "one\u2028two\u2029three"}]},
        {"id": "b", "image": "b.jpg", "conversations": []},
    ]
    p = tmp_path / "data.jsonl"
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)  # U+2028 stays a literal character
    p.write_text(body + "\n" + '{"id": "c", "image": \n', encoding="utf-8")
    with pytest.raises(LlavaJSONError) as e:  # before: line 1 (str.splitlines splits at U+2028)
        read_llava_records(p)
    assert str(e.value) == f"{p}:4: not valid JSON (Expecting value)"
    p.write_text(body, encoding="utf-8")
    assert read_llava_records(p) == recs


def test_lone_surrogates_in_llava_paths_and_turns_are_one_line(tmp_path, tiny_tokenizer_dir, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(image_bytes(1))
    good = {"id": "s0", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"}]}
    path_rec = {"id": "s1", "image": "b\\ud800.jpg", "conversations": []}
    turn_rec = {"id": 7, "image": "a.jpg", "conversations": [{"from": "gpt", "value": "x \\udfff y"}]}
    jl = tmp_path / "paths.jsonl"
    jl.write_text(json.dumps(good) + "\n" + json.dumps(path_rec).replace("\\\\ud800", "\\ud800") + "\n")
    js = tmp_path / "turns.json"
    js.write_text(json.dumps([good, turn_rec]).replace("\\\\udfff", "\\udfff"))
    why = "holds a lone UTF-16 surrogate escape (such as \\ud800): not valid Unicode text; fix or remove the record"
    want = {
        jl: f"{jl}: line 2 (id 's1'): image {why}",
        js: f"{js}: record 1 (id '7'): conversations[0].value {why}",
    }
    for f, line in want.items():
        rc = main(
            ["tokenize", str(f), "--image-root", str(tmp_path / "imgs"), "--tokenizer", str(tiny_tokenizer_dir)]
            + ["--out", str(tmp_path / "out"), "--no-progress"]
        )
        err = capsys.readouterr().err
        assert rc == 2 and err == f"asvr-pipeline tokenize: error: {line}\n"  # before: UnicodeEncodeError


# --------------------------------------------------------------------------- 8: stop signals
def test_stop_signals_defer_reinstall_and_exit_with_128_plus_signum():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        with pytest.raises(Stopped) as e:  # outside a unit: at once
            signal.raise_signal(signal.SIGUSR1)
        assert (e.value.signum, e.value.exit_code, e.value.name) == (signal.SIGUSR1, 138, "SIGUSR1")
        assert e.value.message() == "stopped by SIGUSR1"
        assert not isinstance(e.value, Exception)  # no `except Exception` swallows it

    with StopSignals() as stop:
        reached = []
        with pytest.raises(Stopped) as e:
            with stop.deferred():
                signal.raise_signal(signal.SIGTERM)  # only noted: the unit finishes
                signal.raise_signal(signal.SIGUSR1)  # a second signal while stopping is ignored
                reached.append("end of unit")
        assert reached == ["end of unit"] and e.value.signum == signal.SIGTERM and stop.received == signal.SIGTERM
        with pytest.raises(ValueError):  # a unit that raised something else keeps its own exception
            with stop.deferred():
                raise ValueError("the unit's own error")

    with StopSignals() as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a library (ray.init) replaced the handler
        stop.reinstall()
        with pytest.raises(Stopped):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before  # the first original, not the library's


def test_run_guarded_prints_the_stop_in_one_line_and_returns_128_plus_signum(capsys):
    def command():
        with StopSignals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, as a scheduler sends it
                time.sleep(5)
                return 0
            except Stopped as e:
                e.detail = "2 units written in OUT; rerun the same command to finish"  # what the pipeline adds
                raise

    assert run_guarded("asvr-pipeline", "tokenize", command) == 143
    assert capsys.readouterr().err == (
        "asvr-pipeline tokenize: stopped by SIGTERM; 2 units written in OUT; rerun the same command to finish\n"
    )


# --------------------------------------------------------------------------- 8: the Ray reaper
SESSION_NAME = "session_2026-01-02_03-04-05_123456_{}"

RAYLET = r"""
import os, subprocess, sys, time
env = {k: v for k, v in os.environ.items() if k != "ASVR_RAY_OWNER"}  # an agent without the token
agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
open(sys.argv[1], "w").write(str(agent.pid))
time.sleep(120)
"""


def _alive(pid: int, start: bytes) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[19] == start and fields[0] not in (b"Z", b"X")


def _start_time(pid: int) -> bytes:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat[stat.rindex(b")") + 2 :].split()[19]


def _wait_for(pred, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {limit} s for {what}")
        time.sleep(0.05)


@pytest.fixture
def stand_ins(tmp_path):
    """Processes standing in for a local Ray: a 'raylet' with the token and the session folder on
    its command line, whose 'agent' child has neither; a 'worker' with neither whose stderr is a
    log file of the session; a 'log monitor' naming the session; and a bystander."""
    session = tmp_path / SESSION_NAME.format(os.getpid())
    (session / "logs").mkdir(parents=True)
    token = f"test-{os.getpid()}-{time.monotonic_ns()}"
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    clean = {k: v for k, v in os.environ.items() if k != MARK}
    procs = {}
    procs["raylet"] = subprocess.Popen(
        [sys.executable, "-c", RAYLET, str(tmp_path / "agent.pid"), f"--session-dir={session}"],
        env={**clean, MARK: token},
    )
    with open(session / "logs" / "worker-01.err", "wb") as log:
        procs["worker"] = subprocess.Popen(sleep, env=clean, stderr=log)
    procs["monitor"] = subprocess.Popen([*sleep, f"--logs-dir={session}/logs"], env=clean)
    procs["bystander"] = subprocess.Popen(sleep, env=clean)
    try:
        _wait_for(lambda: (tmp_path / "agent.pid").is_file() and (tmp_path / "agent.pid").read_text(), "the agent")
        agent = int((tmp_path / "agent.pid").read_text())
        yield token, session, procs, agent
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        try:
            if (tmp_path / "agent.pid").is_file():
                os.kill(int((tmp_path / "agent.pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_owned_processes_finds_token_less_ones_by_session_and_parent(stand_ins):
    token, session, procs, agent = stand_ins
    ray = {procs["raylet"].pid, procs["worker"].pid, procs["monitor"].pid, agent}
    assert set(owned_processes(token)) == {procs["raylet"].pid, agent} | {
        procs["worker"].pid,  # its stderr is under the session read off the raylet's command line
        procs["monitor"].pid,
    }
    assert set(owned_processes(token, [str(session)])) == ray
    assert not set(owned_processes("another-token"))  # nothing carries another token
    assert procs["bystander"].pid not in owned_processes(token, [str(session)])


def test_the_reaper_kills_token_less_processes_after_their_parent_died(stand_ins):
    token, session, procs, agent = stand_ins
    agent_start = _start_time(agent)
    reaper = subprocess.Popen(
        [sys.executable, "-m", "asvr.pipeline.job.ray_reaper", token], stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        reaper.stdin.write(os.fsencode(str(session)) + b"\n")  # what Reaper.watch_session sends
        reaper.stdin.flush()
        time.sleep(2.0)  # a few of the reaper's 0.5 s scans, while the 'raylet' lives
        procs["raylet"].kill()  # fate-sharing took the raylet first: the agent's parent is gone
        procs["raylet"].wait()
        assert _alive(agent, agent_start)  # orphaned, token-less, its command line names nothing
        reaper.stdin.close()  # the driver died
        assert reaper.wait(30) == 0
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait()
    _wait_for(lambda: not _alive(agent, agent_start), "the agent to die")
    for name in ("worker", "monitor"):
        assert procs[name].wait(30) == -signal.SIGKILL, name
    assert procs["bystander"].poll() is None  # not this Ray's


def test_reaper_class_marks_only_the_processes_started_inside(tmp_path):
    reaper = Reaper()
    try:
        with reaper.marked():
            tagged = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        untagged = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        assert MARK not in os.environ
        assert owned_processes(reaper.token) == [tagged.pid]
        reaper.close()  # the driver's normal end: the reaper removes what is left, and exits
        assert tagged.wait(30) == -signal.SIGKILL and untagged.poll() is None
    finally:
        for p in (tagged, untagged):
            if p.poll() is None:
                p.kill()
            p.wait()
        reaper.close()


# --------------------------------------------------------------------------- one real run over all of it
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run_23c(tmp_path_factory, tiny_tokenizer_dir, ray_local):
    """Sparse tars of every kind, a Parquet file with a cell over --max-read-mb 1, a struct cell
    naming a path, a 9000x9000 16-bit PNG: one tokenize run."""
    d = tmp_path_factory.mktemp("run23c")
    data = _holey_bmp()
    tars = [_sparse_tar(d, fmt, data) for fmt in SPARSE_FORMATS]
    big, huge = _parquet_over_limit(d / "big.parquet", 2**20)
    hf = _struct_parquet(d / "hf.parquet")
    (d / "png").mkdir()
    (d / "png" / "deep16.png").write_bytes(_png16(9000, 9000))
    (d / "png" / "holey.bmp").write_bytes(data)
    out = d / "out"
    rc = main(
        ["tokenize", *map(str, tars), str(big), str(hf), str(d / "png"), "--tokenizer", str(tiny_tokenizer_dir)]
        + ["--out", str(out), "--no-progress", "--max-read-mb", "1", "--batch-size", "4"]
    )
    return rc, out, huge


def test_the_run_reads_sparse_members_right_and_fails_the_rest_in_rows(run_23c, capsys):
    rc, out, huge = run_23c
    assert rc == 0
    fails = {f["key"]: (f["stage"], f["error"]) for f in pq.read_table(out / FAILURES).to_pylist()}
    assert fails == {
        "huge": (
            "read",
            f"row group 1 of column 'image' (1 rows; the reader reads a row group at once) is {huge / 2**20:.1f} "
            "MiB, more than the 1 MiB one decode task reads (--max-read-mb); write the file with smaller row "
            "groups (pyarrow row_group_size)",
        ),
        "sb": (
            "read",
            "image cell is a struct with path 'photos/b.jpg' but no bytes: files named by a Parquet cell are not "
            "opened; embed the image bytes in the file",
        ),
        "sc": ("read", "image cell is null"),
        # the pipeline's decode budget (its tasks' memory reservation): before, the 16-bit PNG decoded
        "deep16.png": ("decode", "decoding 9000x9000 I;16 needs about 618 MiB, more than the 512 MiB of a decode task"),
    }
    codes = {}
    for p in sorted(out.glob("part-*.parquet")):
        _, t = read_shard(p)
        codes.update(zip(t.column("key").to_pylist(), t.column("codes").to_pylist()))
    assert set(codes) == {"p0", "p2", "sa", "holey.bmp"} | {f"{k}_{f}" for f in SPARSE_FORMATS for k in ("s", "after")}
    for fmt in SPARSE_FORMATS:  # the same image as the plain file, so the same codes
        assert codes[f"s_{fmt}"] == codes["holey.bmp"], fmt
    assert json.loads((out / MANIFEST).read_text())["counts"] == {
        "seen": 16,
        "encoded": 12,
        "failed": 4,
        "duplicate": 0,
        "ignored": 0,
    }
    assert verify_out(out).ok
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()


def test_verify_is_not_ok_over_a_cut_sparse_tar(run_23c, tiny_tokenizer_dir, tmp_path, capsys):
    tar = _sparse_tar(tmp_path, "pax01", _holey_bmp())
    with tarfile.open(tar) as t:
        first = t.getmembers()[0]
    tar.write_bytes(tar.read_bytes()[: first.offset_data + 4096 + 100])
    out = tmp_path / "out"
    assert main(["tokenize", str(tar), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out), "--no-progress"]) == 0
    fails = {f["key"]: (f["stage"], f["error"]) for f in pq.read_table(out / FAILURES).to_pylist()}
    assert fails["s_pax01"] == ("read", "sparse tar member is truncated: wanted 49206 bytes (unexpected end of data)")
    assert fails["pax01.tar#truncated"][0] == "input"
    assert not list(out.glob("part-*.parquet")) or not any(
        read_shard(p)[1].num_rows for p in out.glob("part-*.parquet")
    )
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1  # never OK over a member read from the wrong bytes or lost
