"""The real job on a real local Ray (one 2-CPU instance for the module): every input
format against the tokenizer's in-process encode, bad files and the counting
invariant, hostile keys, resume after a kill -9, fingerprint refusal, webdataset
output, inspect and verify."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_tiny_tokenizer, image_bytes, make_image, write_image_folder, tokenize_cmd
from PIL import Image

from asvr.pipeline.output.check import verify_out
from asvr.pipeline.cli import main
from asvr.core.shards import FAILURES, MANIFEST, load_codes, read_shard

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def add_member(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def reference(tok, datas) -> np.ndarray:
    return tok.encode_images(list(datas)).numpy()


def tokenize(*args) -> int:
    return main(["tokenize", *map(str, args), "--no-progress", "--batch-size", "4"])


def failures(out) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(Path(out) / FAILURES).to_pylist()}


# --------------------------------------------------------------------------- every input format
def test_all_input_formats_match_in_process_encode(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    expect: dict[str, bytes] = {}
    captions: dict[str, str | None] = {}
    # folder (one sidecar caption)
    for k in write_image_folder(tmp_path / "folder", 3):
        expect[k] = (tmp_path / "folder" / k).read_bytes()
        captions[k] = None
    (tmp_path / "folder" / "d0" / "img_00000.txt").write_text("folder caption")
    captions["d0/img_00000.jpg"] = "folder caption"
    # two webdataset tars through a brace pattern, txt and json captions, hostile member names
    for s in range(2):
        with tarfile.open(tmp_path / f"wds-{s:03d}.tar", "w") as tar:
            for i, name in enumerate((f"t{s}/a", f"t{s}/b", "../../evil" if s == 0 else "/abs/evil")):
                data = image_bytes(100 + 10 * s + i, fmt="PNG" if i == 1 else "JPEG")
                add_member(tar, name + (".png" if i == 1 else ".jpg"), data)
                expect[name], captions[name] = data, None
            add_member(tar, f"t{s}/a.txt", f"tar {s} a".encode())
            add_member(tar, f"t{s}/b.json", json.dumps({"caption": f"tar {s} b"}).encode())
            captions[f"t{s}/a"], captions[f"t{s}/b"] = f"tar {s} a", f"tar {s} b"
    # Parquet with a Hugging Face {bytes, path} image struct and a caption column
    pdatas = [image_bytes(200 + i, size=(50 + 7 * i, 40)) for i in range(3)]
    pq.write_table(
        pa.table(
            {
                "key": [f"pq{i}" for i in range(3)],
                "image": [{"bytes": d, "path": None} for d in pdatas],
                "caption": ["p0", None, "p2"],
            }
        ),
        tmp_path / "rows.parquet",
        row_group_size=2,
    )
    for i, d in enumerate(pdatas):
        expect[f"pq{i}"], captions[f"pq{i}"] = d, ["p0", None, "p2"][i]
    # LLaVA JSON: an image referenced twice, one escaping --image-root, one absolute
    root = tmp_path / "llava"
    for k in write_image_folder(root, 2, start=300, sub=False):
        expect[k], captions[k] = (root / k).read_bytes(), None
    (tmp_path / "secret.jpg").write_bytes(image_bytes(7))
    conv = [
        {"id": str(i), "image": im, "conversations": []}
        for i, im in enumerate(
            ["img_00300.jpg", "img_00301.jpg", "img_00300.jpg", "../secret.jpg", str(tmp_path / "secret.jpg")]
        )
    ]
    (tmp_path / "chat.json").write_text(json.dumps(conv))

    out = tmp_path / "out"
    job = (
        tmp_path / "folder",
        tmp_path / "wds-{000..001}.tar",
        tmp_path / "rows.parquet",
        tmp_path / "chat.json",
        "--image-root",
        root,
        "--tokenizer",
        tiny_tokenizer_dir,
        "--out",
        out,
        "--shard-size",
        "5",
    )
    rc = tokenize(*job)
    assert rc == 0
    meta, codes = load_codes(out, tiny_tokenizer.spec.fingerprint)
    assert set(codes) == set(expect)
    keys = sorted(expect)
    ref = reference(tiny_tokenizer, [expect[k] for k in keys])
    np.testing.assert_array_equal(np.stack([codes[k] for k in keys]).astype(np.int64), ref)
    rows = {}
    for path in sorted(out.glob("part-*.parquet")):
        for r in read_shard(path)[1].to_pylist():
            rows[r["key"]] = r
    for k in keys:
        assert rows[k]["caption"] == captions[k], k
        img = Image.open(io.BytesIO(expect[k]))
        assert (rows[k]["width"], rows[k]["height"]) == img.size
    fails = failures(out)
    assert set(fails) == {"../secret.jpg", str(tmp_path / "secret.jpg")}
    assert all(f["stage"] == "read" and "escapes --image-root" in f["error"] for f in fails.values())
    m = json.loads((out / MANIFEST).read_text())
    assert m["complete"] and m["counts"] == {
        "seen": len(expect) + 2,
        "encoded": len(expect),
        "failed": 2,
        "duplicate": 0,
        "ignored": 0,
    }
    assert not (tmp_path.parent / "evil").exists() and not Path("/abs").exists()
    assert verify_out(out).ok

    # a rerun of a finished job does nothing and changes nothing
    before = (out / MANIFEST).read_bytes()
    assert tokenize(*job) == 0
    assert (out / MANIFEST).read_bytes() == before


# --------------------------------------------------------------------------- bad files
def _bad_corpus(root: Path) -> dict[str, str | None]:
    """key -> expected failure stage (None: must be encoded)."""
    root.mkdir()
    good = image_bytes(1, size=(300, 200))
    cases: dict[str, str | None] = {}

    def put(name, data, stage):
        (root / name).write_bytes(data)
        cases[name] = stage

    put("truncated.jpg", good[: len(good) // 2], "decode")
    put("zero.jpg", b"", "decode")
    put("text.jpg", b"this is not an image at all\n" * 10, "decode")
    buf = io.BytesIO()
    Image.new("RGB", (1100, 1000), (10, 20, 30)).save(buf, "PNG")  # 1.1 Mpx > --max-pixels 1e6
    put("bomb.png", buf.getvalue(), "decode")
    buf = io.BytesIO()
    make_image(2, (990, 1000)).save(buf, "JPEG")  # big but under the limit
    put("huge.jpg", buf.getvalue(), None)

    def save(name, img, fmt, **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        put(name, b.getvalue(), None)

    save("tiny.png", make_image(3, (1, 1)), "PNG")
    save("cmyk.jpg", make_image(4).convert("CMYK"), "JPEG")
    arr16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    img16 = Image.fromarray(arr16)
    assert img16.mode == "I;16"
    save("gray16.png", img16, "PNG")
    pal = make_image(5).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    save("palette.png", pal, "PNG", transparency=0)
    save("alpha.png", make_image(6, mode="RGBA"), "PNG")
    save("gray.jpg", make_image(7, mode="L"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 cw on display
    save("rotated.jpg", make_image(8, (80, 40)), "JPEG", exif=exif.tobytes())
    return cases


def test_bad_files_counting_invariant_and_stages(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    cases = _bad_corpus(tmp_path / "bad")
    # the same key in two tars: the second is a duplicate
    for s in range(2):
        with tarfile.open(tmp_path / f"dup-{s}.tar", "w") as tar:
            add_member(tar, "same.jpg", image_bytes(50 + s))
    out = tmp_path / "out"
    assert (
        tokenize(
            tmp_path / "bad",
            tmp_path / "dup-0.tar",
            tmp_path / "dup-1.tar",
            "--tokenizer",
            tiny_tokenizer_dir,
            "--out",
            out,
            "--max-pixels",
            "1000000",
            "--shard-size",
            "6",
        )
        == 0
    )
    m = json.loads((out / MANIFEST).read_text())
    c = m["counts"]
    n_fail = sum(1 for s in cases.values() if s)
    assert c == {
        "seen": len(cases) + 2,
        "encoded": len(cases) - n_fail + 1,
        "failed": n_fail,
        "duplicate": 1,
        "ignored": 0,
    }
    assert c["seen"] == c["encoded"] + c["failed"] + c["duplicate"]
    fails = failures(out)
    assert fails["same"]["stage"] == "duplicate" and "dup-0.tar" in fails["same"]["error"]
    for k, stage in cases.items():
        if stage:
            assert fails[k]["stage"] == stage and fails[k]["error"], k
    assert "decompression bomb" in fails["bomb.png"]["error"]
    assert "0 bytes" in fails["zero.jpg"]["error"]
    _, codes = load_codes(out)
    good = sorted(k for k, s in cases.items() if s is None)
    assert set(codes) == set(good) | {"same"}
    ref = reference(tiny_tokenizer, [(tmp_path / "bad" / k).read_bytes() for k in good])
    np.testing.assert_array_equal(np.stack([codes[k] for k in good]).astype(np.int64), ref)
    rows = {r["key"]: r for p in out.glob("part-*.parquet") for r in read_shard(p)[1].to_pylist()}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (40, 80)  # EXIF applied
    assert verify_out(out).ok


# --------------------------------------------------------------------------- resume after kill -9
def test_resume_after_kill_equals_clean_run(tmp_path, tiny_tokenizer_dir, ray_local):
    write_image_folder(tmp_path / "imgs", 20)
    args = [tmp_path / "imgs", "--tokenizer", tiny_tokenizer_dir, "--shard-size", "3", "--batch-size", "3"]
    clean = tmp_path / "clean"
    assert tokenize(*args, "--out", clean) == 0

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "asvr.pipeline.cli",
        "tokenize",
        *map(str, args),
        "--out",
        str(out),
        "--no-progress",
        "--ray-address",
        ray_local,
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(out.glob("part-*.parquet")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started in its session
    finally:
        proc.wait()
    m = json.loads((out / MANIFEST).read_text())
    assert not m["complete"], "the run finished before the kill; nothing was tested"
    assert 1 <= len(list(out.glob("part-*.parquet"))) < 7

    assert tokenize(*args, "--out", out) == 0
    assert (out / MANIFEST).read_text() == (clean / MANIFEST).read_text()  # same shards, same sha256s
    for p in sorted(clean.glob("part-*.parquet")):
        assert read_shard(out / p.name)[1].equals(read_shard(p)[1])
    assert sorted(x.name for x in out.glob("part-*")) == sorted(x.name for x in clean.glob("part-*"))
    assert not list(out.glob(".*.tmp-*"))
    assert verify_out(out).ok


def test_sigterm_stops_in_one_line_and_the_rerun_equals_a_clean_run(tmp_path, tiny_tokenizer_dir, ray_local):
    """A scheduler's SIGTERM to the driver: exit 143 and one line saying how to resume (not Ray's
    native dump, exit 134: ``ray.init`` installs its own SIGTERM handler, which the run replaces);
    the rerun gives the uninterrupted run's manifest and shards."""
    import re

    write_image_folder(tmp_path / "imgs", 20)
    args = [tmp_path / "imgs", "--tokenizer", tiny_tokenizer_dir, "--shard-size", "3", "--batch-size", "3"]
    clean = tmp_path / "clean"
    assert tokenize(*args, "--out", clean) == 0

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "asvr.pipeline.cli", "tokenize", *map(str, args), "--out", str(out)]
    cmd += ["--no-progress", "--ray-address", ray_local]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(out.glob("part-*.parquet")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    m = json.loads((out / MANIFEST).read_text())
    assert not m["complete"], "the run finished before the signal; nothing was tested"
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err
    assert re.fullmatch(
        rf"asvr-pipeline tokenize: stopped by SIGTERM; \d+ finished units are kept in {re.escape(str(out))}; "
        "rerun the same command to resume",
        err.strip().splitlines()[-1],
    ), err[-2000:]

    assert tokenize(*args, "--out", out) == 0
    assert (out / MANIFEST).read_text() == (clean / MANIFEST).read_text()  # same shards, same sha256s
    for p in sorted(clean.glob("part-*.parquet")):
        assert read_shard(out / p.name)[1].equals(read_shard(p)[1])
    assert not list(out.glob(".*.tmp-*"))
    assert verify_out(out).ok


# --------------------------------------------------------------------------- refusal, webdataset, inspect/verify
def test_refusal_webdataset_output_and_verify(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, capsys):
    keys = write_image_folder(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    assert tokenize(tmp_path / "imgs", "--tokenizer", tiny_tokenizer_dir, "--out", out, "--shard-size", "2") == 0
    _, parquet_codes = load_codes(out)

    other = build_tiny_tokenizer(tmp_path / "other_tok", seed=1)
    capsys.readouterr()
    for extra in (
        ["--tokenizer", other],
        ["--tokenizer", tiny_tokenizer_dir, "--preprocess", "pad"],
        ["--tokenizer", tiny_tokenizer_dir, "--format", "webdataset"],
    ):
        assert tokenize(tmp_path / "imgs", *extra, "--out", out, "--shard-size", "2") == 2
        err = capsys.readouterr().err
        assert "other settings" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1

    # inspect / verify on the good output, then tamper with a shard
    assert main(["inspect", str(out)]) == 0
    assert "encoded 4" in capsys.readouterr().out
    shard = sorted(out.glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "sha256 differs" in capsys.readouterr().err

    # --overwrite with the webdataset format: same rows, readable by the webdataset library
    assert (
        tokenize(
            tmp_path / "imgs",
            "--tokenizer",
            tiny_tokenizer_dir,
            "--format",
            "webdataset",
            "--out",
            out,
            "--shard-size",
            "2",
            "--overwrite",
        )
        == 0
    )
    assert not list(out.glob("part-*.parquet")) and len(list(out.glob("shard-*.tar"))) == 2
    _, wds_codes = load_codes(out)
    assert set(wds_codes) == set(keys)
    for k in keys:
        np.testing.assert_array_equal(wds_codes[k], parquet_codes[k])
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "shard-{00000..00001}.tar"), shardshuffle=False))
    assert len(samples) == 4
    s0 = samples[0]
    arr = np.load(io.BytesIO(next(v for k, v in s0.items() if k.endswith("codes.npy"))))
    assert arr.shape == (7, 7, 3) and arr.dtype == np.uint16
    assert main(["verify", str(out)]) == 0


# --------------------------------------------------------------------------- a quiet run
def test_a_local_run_prints_only_our_lines(tmp_path, tiny_tokenizer_dir):
    """Its own local Ray, as a user's first run: no token-auth warning, no "Progress bars
    disabled", no core_worker.cc line; the summary on stdout, nothing on stderr."""
    write_image_folder(tmp_path / "imgs", 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = tokenize_cmd(tmp_path / "imgs", tiny_tokenizer_dir, tmp_path / "out", "--num-cpus", "2")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ""
    assert r.stdout.splitlines()[0] == "seen 4  encoded 4  failed 0  duplicate 0"
    assert r.stdout.splitlines()[-1] == f"wrote {tmp_path / 'out'}"


def test_the_encode_pool_runs_its_udf_on_the_actor_main_thread():
    """torch's intra-op threads lose ~0.5 of 2 cores under Ray Data's default one-thread executor
    (ray_job._actor_pool); Ray's default pool runs the UDF off the main thread, ours on it."""
    import ray.data

    from asvr.pipeline.job.ray_job import _actor_pool

    class ThreadName:  # defined here: pickled by value (the workers cannot import this test module)
        def __call__(self, batch):
            import threading

            batch["main"] = np.array([threading.current_thread() is threading.main_thread()] * len(batch["id"]))
            return batch

    def ran_on_main(compute) -> set:
        ds = ray.data.range(4, override_num_blocks=2).map_batches(
            ThreadName, batch_size=None, batch_format="numpy", compute=compute, num_cpus=1
        )
        return {bool(v) for v in ds.to_pandas()["main"]}

    assert ran_on_main(_actor_pool(1)) == {True}
    assert ran_on_main(ray.data.ActorPoolStrategy(size=1)) == {False}  # the default this replaces
