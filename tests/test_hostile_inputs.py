"""Hostile and messy inputs (issue 9): every case is generated here, and each test
failed on the code before the fix.  No crash, no hang, no silent loss, no escape.

Unit level first (discovery, decoding, shard files, output directory: no Ray),
then one real pipeline run over all the hostile inputs at once (one local Ray
for the module), then Ray's own start-up and shutdown in subprocesses."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, make_image, write_image_folder, tokenize_cmd
from PIL import Image

from asvr.pipeline.output.check import verify_out
from asvr.pipeline.cli import main
from asvr.core.shards import (
    FAILURES,
    MANIFEST,
    ShardError,
    ShardMeta,
    ShardRow,
    read_meta,
    read_shard,
    rows_to_table,
    write_parquet_shard,
    write_webdataset_shard,
)
from asvr.pipeline.inputs.sources import SourceError, SourceOptions, discover
from asvr.pipeline.job.stages import ReadDecode, decode_one
from asvr.pipeline.output.writer import OutputDir
from asvr.tokenizer.preprocess import ImageError, PreprocessConfig, open_image

CFG = PreprocessConfig(image_size=32)


def add_member(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def plan_rows(*inputs, **opts) -> list[dict]:
    plan, _ = discover([str(i) for i in inputs], SourceOptions(**opts))
    return plan.to_pylist()


def by_key(rows, kind=None) -> dict[str, dict]:
    return {r["key"]: r for r in rows if kind is None or r["kind"] == kind}


# --------------------------------------------------------------------------- folders: crashes and hangs
def test_symlink_loop_in_folder_is_a_failure_row(tmp_path):
    write_image_folder(tmp_path / "imgs", 1, sub=False)
    os.symlink("loop.jpg", tmp_path / "imgs" / "loop.jpg")  # before: RuntimeError: Symlink loop, job dies
    rows = by_key(plan_rows(tmp_path / "imgs"))
    assert rows["loop.jpg"]["kind"] == "error" and "symlink" in rows["loop.jpg"]["error"].lower()
    assert rows["img_00000.jpg"]["kind"] == "file"


def test_non_utf8_file_name_is_a_failure_row(tmp_path):
    write_image_folder(tmp_path / "imgs", 1, sub=False)
    with open(os.fsencode(str(tmp_path / "imgs")) + b"/caf\xe9.jpg", "wb") as f:  # latin-1 name
        f.write(image_bytes(1))
    rows = by_key(plan_rows(tmp_path / "imgs"))  # before: UnicodeEncodeError building the plan, job dies
    bad = rows["caf\\xe9.jpg"]
    assert bad["kind"] == "error" and "not valid UTF-8" in bad["error"]
    assert rows["img_00000.jpg"]["kind"] == "file"


def test_fifo_named_like_an_image_is_never_opened(tmp_path):
    (tmp_path / "imgs").mkdir()
    os.mkfifo(tmp_path / "imgs" / "x.jpg")
    rows = by_key(plan_rows(tmp_path / "imgs"))
    assert rows["x.jpg"]["kind"] == "error" and "FIFO" in rows["x.jpg"]["error"]
    # a FIFO swapped in after discovery: the reader refuses it instead of blocking forever
    plan, _ = discover([str(tmp_path / "imgs")], SourceOptions())
    batch = {k: np.asarray(v, dtype=object) for k, v in plan.to_pydict().items()}
    batch["kind"][:] = "file"  # as if discovery had seen a regular file
    batch["idx"] = np.arange(plan.num_rows)
    result = {}
    t = threading.Thread(target=lambda: result.update(ReadDecode(CFG)(batch)), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader stuck in open() so the test process can go on
        os.close(os.open(tmp_path / "imgs" / "x.jpg", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO named x.jpg blocked")
    assert not result["ok"][0] and "FIFO" in result["error"][0]


def test_llava_nul_byte_and_deep_json(tmp_path):
    root = tmp_path / "root"
    write_image_folder(root, 1, sub=False)
    (tmp_path / "chat.json").write_text(
        json.dumps([{"id": "a", "image": "img_00000.jpg\u0000.png"}, {"id": "b", "image": "img_00000.jpg"}])
    )
    rows = by_key(plan_rows(tmp_path / "chat.json", image_root=str(root)))  # before: ValueError traceback
    assert rows["img_00000.jpg\x00.png"]["kind"] == "error" and "NUL" in rows["img_00000.jpg\x00.png"]["error"]
    assert rows["img_00000.jpg"]["kind"] == "file"
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SourceError, match="nested too deeply"):  # before: RecursionError traceback
        plan_rows(tmp_path / "deep.json", image_root=str(root))


def test_deep_json_conversations_are_a_one_line_training_error(tmp_path):
    from asvr.train.data.sources import DataError, load_conversations

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_conversations([tmp_path / "deep.json"])


# --------------------------------------------------------------------------- tars: silent loss
def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def test_tar_member_with_two_dots_is_an_image_of_its_webdataset_key(tmp_path):
    p = _tar(tmp_path / "a.tar", [("x.v2.jpg", image_bytes(1)), ("y.jpg", image_bytes(2))])
    rows = by_key(plan_rows(p), "tar")  # before: x.v2.jpg skipped without a trace
    assert set(rows) == {"x", "y"}
    with open(p, "rb") as f:
        f.seek(rows["x"]["offset"])
        assert f.read(rows["x"]["size"]) == image_bytes(1)


def test_repeated_tar_member_is_a_second_row_with_the_same_key(tmp_path):
    p = _tar(tmp_path / "a.tar", [("x.jpg", image_bytes(1)), ("x.jpg", image_bytes(2)), ("x.png", image_bytes(3))])
    rows = [r for r in plan_rows(p) if r["kind"] == "tar"]  # before: one row, the other copies dropped
    assert [r["key"] for r in rows] == ["x", "x", "x"]  # the runner counts the later ones as duplicates


def test_tar_members_that_are_not_images_are_listed_as_ignored(tmp_path):
    p = _tar(
        tmp_path / "a.tar",
        [("x.jpg", image_bytes(1)), ("x.txt", b"cap"), ("x.cls", b"3"), ("notes.md", b"readme"), ("noext", b"?")],
    )
    ignored = {r["key"]: r["error"] for r in plan_rows(p) if r["kind"] == "ignored"}
    assert set(ignored) == {"x.cls", "notes.md", "noext"}  # x.txt is x's caption, not ignored


def test_tar_cut_inside_a_header_is_an_input_failure_row(tmp_path):
    p = _tar(tmp_path / "a.tar", [(f"k{i}.jpg", image_bytes(i)) for i in range(4)])
    with tarfile.open(p) as tar:
        third = tar.getmembers()[2].offset
    data = p.read_bytes()
    p.write_bytes(data[: third + 200])  # cut 200 bytes into the third member's header
    rows = plan_rows(p)
    assert [r["key"] for r in rows if r["kind"] == "tar"] == ["k0", "k1"]
    cut = [r for r in rows if r["kind"] == "input"]  # before: nothing; k2, k3 vanished silently
    assert len(cut) == 1 and "cut inside a member header" in cut[0]["error"] and str(p) in cut[0]["error"]


# --------------------------------------------------------------------------- decoding: reasons, ranges, bombs
def _png(w, h, crc_ok=True) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind, body, ok=True):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) ^ (not ok))

    raw = zlib.compress(b"".join(b"\0" + b"\0" * 3 * w for _ in range(max(h, 1))))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr, crc_ok) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_png_decoder_reasons_are_reported():
    with pytest.raises(ImageError) as bad_crc:
        open_image(_png(4, 4, crc_ok=False))
    assert "checksum" in bad_crc.value.reason and "IHDR" in bad_crc.value.reason  # before: format not recognised
    with pytest.raises(ImageError) as zero:
        open_image(_png(0, 4))
    assert "PNG" in zero.value.reason and "0x4" in zero.value.reason


def test_float_tiff_in_unit_range_is_scaled_not_black():
    arr = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    img = open_image(buf.getvalue())
    got = np.asarray(img)[..., 0].astype(int)
    np.testing.assert_array_equal(got, np.rint(arr * 255).astype(int))  # before: max value 1 of 255
    out_of_range = io.BytesIO()
    Image.fromarray(arr * 1000 - 5, "F").save(out_of_range, format="TIFF")
    with pytest.raises(ImageError, match="float image"):
        open_image(out_of_range.getvalue())


def test_pad_canvas_is_bounded_by_max_pixels_and_fitting_images_are_unchanged():
    thin = io.BytesIO()
    Image.new("RGB", (3000, 1), (10, 20, 30)).save(thin, format="PNG")
    cfg = PreprocessConfig(image_size=32, mode="pad", max_pixels=1_000_000)
    with pytest.raises(ImageError) as e:  # before: a 3000x3000 canvas was built (30000x1: 2.7 GB)
        decode_one(thin.getvalue(), cfg)
    assert e.value.stage == "preprocess" and "canvas" in e.value.reason
    # an image whose canvas fits: exactly the reference's expand2square + resize
    img = make_image(5, size=(60, 20))
    data = image_bytes(5, fmt="PNG", size=(60, 20))
    canvas = Image.new("RGB", (60, 60), cfg.background)
    canvas.paste(img, (0, 20))
    want = np.asarray(canvas.resize((32, 32), resample=Image.BICUBIC))
    np.testing.assert_array_equal(decode_one(data, cfg)[0], want)


# --------------------------------------------------------------------------- shard files
def _meta(k=32) -> ShardMeta:
    return ShardMeta(fingerprint="f" * 64, grid=(2, 2), depth=3, codebook_size=k, preprocess="square")


def _table(keys, seed=0, k=32):
    codes = np.random.default_rng(seed).integers(0, k, (len(keys), 2, 2, 3))
    n = len(keys)
    return rows_to_table(_meta(k), keys, codes, ["0" * 64] * n, [8] * n, [6] * n, [None] * n)


def test_webdataset_output_uses_positional_member_names(tmp_path):
    import webdataset as wds

    keys = ["../../../x", "x.jpg", "x.png", "/abs/y"]
    table = _table(keys)
    path = tmp_path / "shard-00007.tar"
    write_webdataset_shard(path, table)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert all(re.fullmatch(r"00007_\d{6}\.(codes\.npy|json)", n) for n in names), names
        tar.extractall(tmp_path / "x", filter="data")  # the contract makes even a plain extractall safe
    assert not (tmp_path / "x.codes.npy").exists() and len(list((tmp_path / "x").iterdir())) == 8
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [json.loads(s["json"])["key"] for s in samples] == keys  # four samples, none merged
    meta, back = read_shard(path)
    assert back.equals(table) and read_meta(path) == meta


def test_codes_outside_the_codebook_are_refused_when_a_shard_is_opened(tmp_path):
    from asvr.train.data.sources import CodeStore

    good = _table(["a", "b", "c"])
    codes = good.column("codes").combine_chunks().values.to_numpy().copy()
    codes[12 + 5] = 40  # row "b" gets code 40 >= K=32
    bad = good.set_column(1, "codes", pa.FixedSizeListArray.from_arrays(pa.array(codes, pa.uint16()), 12))
    (tmp_path / "codes").mkdir()
    pq.write_table(bad, tmp_path / "codes" / "part-00000.parquet")
    with pytest.raises(ShardError, match=r"part-00000\.parquet: key 'b' has code 40 outside \[0, 32\)"):
        read_shard(tmp_path / "codes" / "part-00000.parquet")
    with pytest.raises(ShardError, match="key 'b'"):  # before: opened fine, IndexError when sampled
        CodeStore.open(tmp_path / "codes", "f" * 64)


def test_truncated_parquet_shard_is_a_shard_error_naming_the_file(tmp_path):
    p = tmp_path / "part-00000.parquet"
    write_parquet_shard(p, _table(["a", "b"]))
    p.write_bytes(p.read_bytes()[:-100])
    for read in (read_meta, read_shard):  # before: pyarrow's ArrowInvalid, no file name
        with pytest.raises(ShardError, match=re.escape(str(p))):
            read(p)
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    with pytest.raises(ShardError, match="garbage.parquet: unreadable code shard"):
        read_shard(tmp_path / "garbage.parquet")


# --------------------------------------------------------------------------- the output directory
def test_out_that_is_a_file_is_a_one_line_error(tmp_path, tiny_tokenizer_dir, capsys):
    write_image_folder(tmp_path / "imgs", 1)
    (tmp_path / "out").write_text("not a folder")
    rc = main(
        [
            "tokenize",
            str(tmp_path / "imgs"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not a folder" in err[0]  # before: FileExistsError traceback


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = OutputDir(tmp_path / "out", {"format": "parquet", "fingerprint": "f" * 64})
        rows = [ShardRow(k, np.zeros(12, np.uint16), "0" * 64, 1, 1, None) for k in ("a", "b")]
        out.commit_unit(
            0,
            "h",
            _meta(),
            rows,
            [{"key": "c", "source": "s", "stage": "read", "error": "e"}],
            {"seen": 3, "encoded": 2, "failed": 1, "duplicate": 0, "ignored": 0},
        )
        out.write_manifest([], [out.done(0, "h")], 1)
        out.close()
    finally:
        os.umask(old)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [*(tmp_path / "out").iterdir(), *(tmp_path / "out" / ".units").iterdir()]
        if p.is_file()
    }
    assert modes == {n: 0o644 for n in (".lock", "part-00000.parquet", MANIFEST, FAILURES, "unit-00000.json")}


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MB tmpfs, filled up (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_is_a_one_line_error_naming_the_file(full_disk, tiny_tokenizer_dir, tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", 2)
    rc = main(
        [
            "tokenize",
            str(tmp_path / "imgs"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--out",
            str(full_disk / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err  # before: a traceback ending in ENOSPC
    assert str(full_disk / "out") in err[0] and "No space left on device" in err[0]
    assert not [p for p in (full_disk / "out").rglob("*") if ".tmp-" in p.name]  # no half-written files


# --------------------------------------------------------------------------- one real run over all of it
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_tokenizer_dir, ray_local):
    """Every hostile input at once; the job must finish and account for each of them."""
    d = tmp_path_factory.mktemp("hostile")
    imgs = d / "imgs"
    write_image_folder(imgs, 2, sub=False)
    os.symlink("loop.jpg", imgs / "loop.jpg")
    with open(os.fsencode(str(imgs)) + b"/caf\xe9.jpg", "wb") as f:
        f.write(image_bytes(3))
    os.mkfifo(imgs / "fifo.jpg")
    (imgs / "crc.png").write_bytes(_png(4, 4, crc_ok=False))
    (imgs / "readme.md").write_text("not an image")
    _tar(
        d / "a.tar",
        [("x.v2.jpg", image_bytes(10)), ("y.jpg", image_bytes(11)), ("y.jpg", image_bytes(12)), ("y.cls", b"1")],
    )
    cut = _tar(d / "cut.tar", [(f"c{i}.jpg", image_bytes(20 + i)) for i in range(3)])
    with tarfile.open(cut) as tar:
        third = tar.getmembers()[2].offset
    cut.write_bytes(cut.read_bytes()[: third + 100])
    out = d / "out"
    old = os.umask(0o022)
    try:
        rc = main(
            [
                "tokenize",
                str(imgs),
                str(d / "a.tar"),
                str(cut),
                "--tokenizer",
                str(tiny_tokenizer_dir),
                "--out",
                str(out),
                "--format",
                "webdataset",
                "--no-progress",
                "--batch-size",
                "4",
            ]
        )
    finally:
        os.umask(old)
    return rc, out


def test_hostile_run_finishes_and_accounts_for_every_input(hostile_run):
    rc, out = hostile_run
    assert rc == 0
    m = json.loads((out / MANIFEST).read_text())
    fails = pq.read_table(out / FAILURES).to_pylist()
    stage = {f["key"]: f["stage"] for f in fails}
    assert stage["loop.jpg"] == "read" and stage["caf\\xe9.jpg"] == "read" and stage["fifo.jpg"] == "read"
    assert stage["crc.png"] == "decode" and "checksum" in next(f["error"] for f in fails if f["key"] == "crc.png")
    assert stage["readme.md"] == "ignored" and stage["y.cls"] == "ignored"
    assert stage["y"] == "duplicate" and stage["cut.tar#truncated"] == "input"
    encoded = {
        k for _, t in [read_shard(p) for p in sorted(out.glob("shard-*.tar"))] for k in t.column("key").to_pylist()
    }
    assert encoded == {"img_00000.jpg", "img_00001.jpg", "x", "y", "c0", "c1"}
    c = m["counts"]
    assert c == {"seen": 12, "encoded": 6, "failed": 5, "duplicate": 1, "ignored": 2}
    assert c["seen"] + c["ignored"] == 7 + 4 + 2 + 1  # folder files + a.tar members + cut.tar's whole ones + the cut
    assert stat.S_IMODE((out / MANIFEST).stat().st_mode) == 0o644


def test_verify_notices_a_truncated_input(hostile_run, capsys):
    _, out = hostile_run
    rep = verify_out(out)
    assert not rep.ok and any("incomplete input" in p and "cut.tar" in p for p in rep.problems)
    assert main(["verify", str(out)]) == 1  # before: OK


def test_rerun_after_disk_full_is_exact(full_disk, tiny_tokenizer_dir, tmp_path, ray_local):
    write_image_folder(tmp_path / "imgs", 3)
    args = ["tokenize", str(tmp_path / "imgs"), "--tokenizer", str(tiny_tokenizer_dir), "--no-progress"]
    assert main([*args, "--out", str(full_disk / "out")]) == 2
    (full_disk / "filler").unlink()
    assert main([*args, "--out", str(full_disk / "out")]) == 0  # (resume exactness: test_pipeline_run.py)
    assert verify_out(full_disk / "out").ok


# --------------------------------------------------------------------------- Ray: never join by accident
def _pipeline_env(ray_tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)  # Ray's temp folder (address file, sessions) private to this test
    return env


def test_without_address_a_stale_cluster_file_is_not_joined(tmp_path, tiny_tokenizer_dir):
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # what `ray start` leaves behind
        write_image_folder(tmp_path / "imgs", 2)
        r = subprocess.run(
            tokenize_cmd(tmp_path / "imgs", tiny_tokenizer_dir, tmp_path / "out", "--num-cpus", "2"),
            env=_pipeline_env(ray_tmp),
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stderr[-2000:]  # before: tried 127.0.0.1:9, then died on num_cpus
        assert json.loads((tmp_path / "out" / MANIFEST).read_text())["counts"]["encoded"] == 2
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)])


@pytest.mark.slow
def test_without_address_a_running_cluster_is_not_joined(tmp_path, tiny_tokenizer_dir):
    """Another job's `ray start --head` cluster on the machine (same Ray temp folder): not joined."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    env = _pipeline_env(ray_tmp)
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--num-cpus",
                "1",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        other = set(_ray_processes(ray_tmp, b"gcs_server"))
        write_image_folder(tmp_path / "imgs", 2)
        r = subprocess.run(
            tokenize_cmd(tmp_path / "imgs", tiny_tokenizer_dir, tmp_path / "out", "--num-cpus", "2"),
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stderr[-2000:]  # before: joined it, then died on num_cpus
        assert set(_ray_processes(ray_tmp, b"gcs_server")) == other  # the other cluster is untouched
    finally:
        for pid in _ray_processes(ray_tmp):  # never `ray stop`: it stops every Ray on the machine
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(ray_tmp)])


def _ray_processes(ray_tmp: Path, name: bytes = b"") -> list[int]:
    """Processes of the Ray instance whose temp folder is ``ray_tmp`` (by command line or environment)
    whose command line contains ``name``."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            blob = cmd + Path(f"/proc/{d}/environ").read_bytes()
        except OSError:
            continue
        if str(ray_tmp).encode() in blob and name in cmd:
            found.append(int(d))
    return found


@pytest.mark.slow
def test_local_ray_does_not_outlive_a_killed_driver(tmp_path, tiny_tokenizer_dir):
    """kill -9 of the driver once Ray's agents are up: every process of its local Ray must go.
    Before: the two agents waited out a 60 s GCS timeout (64-70 s measured); after: < 1 s."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    write_image_folder(tmp_path / "imgs", 40)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        tokenize_cmd(
            tmp_path / "imgs", tiny_tokenizer_dir, out, "--num-cpus", "2", "--shard-size", "3", "--batch-size", "3"
        ),
        env=_pipeline_env(ray_tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    left = []
    try:
        deadline = time.time() + 300
        while len(_ray_processes(ray_tmp, b"Agent")) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)  # both agents have set their process titles (ray::DashboardAgent, ray::RuntimeEnvAgent)
        time.sleep(1)
        assert proc.poll() is None, "the job ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.time()
        while (left := _ray_processes(ray_tmp)) and time.time() - t0 < 30:
            time.sleep(0.1)
        print(f"Ray processes outlived the driver by {time.time() - t0:.1f} s")
        names = [Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in left if Path(f"/proc/{p}").exists()]
        assert not left, f"{len(left)} Ray processes still alive 30 s after kill -9 of the driver: {names}"
    finally:
        for pid in _ray_processes(ray_tmp):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(ray_tmp)])
