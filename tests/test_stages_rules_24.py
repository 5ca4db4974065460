"""The read/decode and encode stages, called in-process (no Ray), on the rules a one-line bug breaks.

What is pinned, and against which independent reference:

* captions of tar members (``txt``, ``json``, sparse ``txt``, bytes that are not UTF-8, JSON without
  a ``caption`` or not an object) and of folder sidecars: the exact strings written here by hand;
* failure rows (stage and one-line ``error``) for files and tars changed or removed after listing,
  a sparse header overwritten, a tar swapped for its gzip, an unknown row kind, a plug-in reader
  that raises, a decoder that raises, a resize that fails, a decode over ``max_pixels``;
* the decoded block: its keys and dtypes, ``idx`` passed through, width/height and pixels equal
  to PIL's own decode and resize with the configured resample, sha256 of the bytes written here,
  Parquet cells across row groups against pyarrow reading the file, timings bounded by a clock
  read around the call, every file the block opened closed;
* the encode actor: codes equal ``SemanticTokenizer.encode_images`` (fp32, and bf16 autocast),
  the builder's ``chunks``/``compile``/``search_dtype``/``threads`` reach the engine and torch,
  the output block's keys and per-image encode time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import image_bytes
from PIL import Image

import asvr.pipeline.job.stages as stages
from asvr.pipeline.inputs.sources import SourceOptions, discover
from asvr.pipeline.job.stages import Encoder, ReadDecode, TokenizerBuilder, resize_uint8
from asvr.tokenizer.preprocess import ImageError, PreprocessConfig

CFG = PreprocessConfig(image_size=16)
GNU_TAR = shutil.which("tar")
Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- helpers
def _batch(inputs: list[Path], idx: np.ndarray | None = None) -> Batch:
    plan, _ = discover([str(i) for i in inputs], SourceOptions())
    batch = {k: np.asarray(v, dtype=object) for k, v in plan.to_pydict().items()}
    batch["idx"] = np.arange(plan.num_rows) if idx is None else idx
    return batch


def _rows(out: Batch, batch: Batch) -> dict[str, tuple]:
    """key -> (ok, stage, error, caption) of a decoded block."""
    return {
        k: (bool(out["ok"][i]), out["stage"][i], out["error"][i], out["caption"][i])
        for i, k in enumerate(batch["key"])
        if batch["kind"][i] != "ignored"
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gnu_tar(src: Path, tar: Path, names: list[str]) -> None:
    if GNU_TAR is None or b"GNU tar" not in subprocess.run([GNU_TAR, "--version"], capture_output=True).stdout:
        pytest.skip("GNU tar is needed to write sparse members")
    subprocess.run([GNU_TAR, "-cf", str(tar), "--sparse", "--format=gnu", "-C", str(src), *names], check=True)


def _write_holey(path: Path, head: bytes, tail: bytes, at: int = 8192) -> bytes:
    """``head``, a real hole up to ``at``, then ``tail``; -> the bytes the file reads as."""
    with open(path, "wb") as f:
        f.write(head)
        f.seek(at)
        f.write(tail)
    return head + bytes(at - len(head)) + tail


def _sparse_members(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as t:
        members = t.getmembers()
    if not any(m.issparse() for m in members):
        pytest.skip("this file system keeps no holes: the tar holds no sparse member")
    return members


def _holey_bmp() -> bytes:
    """An uncompressed BMP whose bottom half (stored first) is black: zero bytes a hole can hold."""
    a = np.zeros((128, 128, 3), np.uint8)
    a[:64] = np.random.default_rng(3).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "BMP")
    return buf.getvalue()


def _sparse_image_tar(root: Path) -> tuple[Path, bytes]:
    """``s.bmp`` (sparse, first member, header at byte 0) then a plain ``p.jpg``."""
    data = _holey_bmp()
    src = root / "src"
    src.mkdir()
    _write_holey(src / "s.bmp", data[:4096], data[24576:], at=24576)
    (src / "p.jpg").write_bytes(image_bytes(5))
    tar = root / "sp.tar"
    _gnu_tar(src, tar, ["s.bmp", "p.jpg"])
    assert _sparse_members(tar)[0].issparse()
    return tar, data


def _pil_reference(data: bytes, size: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), resample=resample))


# --------------------------------------------------------------------------- captions
def test_tar_captions_are_the_member_text_or_the_json_caption(tmp_path):
    """txt stripped, json ``caption`` (str() of a number), bytes not UTF-8 replaced, and None for a
    json without ``caption``, not an object, or not JSON; the image is never failed by its caption."""
    caps: dict[str, tuple[str, bytes] | None] = {
        "a": ("txt", b"  a plain caption \n"),
        "b": ("json", json.dumps({"caption": "from json", "other": 1}).encode()),
        "c": ("json", b'{"caption": 42}'),
        "d": ("json", b'{"text": "no caption key"}'),
        "e": ("txt", b"caf\xe9 \xff ok\n"),
        "f": ("json", b"[1, 2]"),
        "g": ("json", b"{not json"),
        "h": ("json", b'{"caption": "x\xffy"}'),
        "i": None,
    }
    want = {
        "a": "a plain caption",
        "b": "from json",
        "c": "42",
        "d": None,
        "e": "caf\ufffd \ufffd ok",
        "f": None,
        "g": None,
        "h": "x\ufffdy",
        "i": None,
    }
    imgs = {k: image_bytes(n) for n, k in enumerate(caps)}
    tar = tmp_path / "caps.tar"
    with tarfile.open(tar, "w") as t:
        for k, cap in caps.items():
            _add(t, f"{k}.jpg", imgs[k])
            if cap is not None:
                _add(t, f"{k}.{cap[0]}", cap[1])
    batch = _batch([tar])
    out = ReadDecode(CFG)(batch)
    got = _rows(out, batch)
    assert got == {k: (True, None, None, want[k]) for k in caps}
    assert out["sha256"].tolist() == [_sha(imgs[k]) for k in caps]


def test_folder_captions_come_from_the_plan(tmp_path):
    (tmp_path / "x.jpg").write_bytes(image_bytes(1))
    (tmp_path / "x.txt").write_text("  a sidecar caption\n")
    (tmp_path / "y.jpg").write_bytes(image_bytes(2))
    batch = _batch([tmp_path])
    out = ReadDecode(CFG)(batch)
    assert _rows(out, batch) == {
        "x.jpg": (True, None, None, "a sidecar caption"),
        "y.jpg": (True, None, None, None),
    }


def test_a_sparse_caption_member_is_read_with_its_holes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = image_bytes(7)
    (src / "s.jpg").write_bytes(img)
    cap = _write_holey(src / "s.txt", b"  head words", b"tail words \n")
    (src / "t.jpg").write_bytes(image_bytes(8))
    (src / "t.txt").write_bytes(b"plain one\n")
    tar = tmp_path / "sc.tar"
    _gnu_tar(src, tar, ["s.jpg", "s.txt", "t.jpg", "t.txt"])
    assert [m.issparse() for m in _sparse_members(tar)] == [False, True, False, False]
    batch = _batch([tar])
    assert batch["cap_kind"].tolist() == ["sparse:txt", "txt"]
    out = ReadDecode(CFG)(batch)
    want = "head words" + "\0" * (8192 - len(b"  head words")) + "tail words"
    assert cap.decode().strip() == want  # the file the test wrote, as text
    assert _rows(out, batch) == {"s": (True, None, None, want), "t": (True, None, None, "plain one")}
    assert out["sha256"][0] == _sha(img)


# --------------------------------------------------------------------------- sparse members failing
def test_a_sparse_header_overwritten_after_listing_is_a_read_failure_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    first = image_bytes(4)
    (src / "a.jpg").write_bytes(first)
    data = _holey_bmp()
    _write_holey(src / "s.bmp", data[:4096], data[24576:], at=24576)
    tar = tmp_path / "t.tar"
    _gnu_tar(src, tar, ["a.jpg", "s.bmp"])
    header = _sparse_members(tar)[1].offset
    assert header > 0
    batch = _batch([tar])
    with open(tar, "r+b") as f:
        f.seek(header)
        f.write(b"\x01" * 512)
    out = ReadDecode(CFG)(batch)
    got = _rows(out, batch)
    assert got["a"] == (True, None, None, None)
    ok, stage, error, caption = got["s"]
    assert (ok, stage, caption) == (False, "read", None)
    # the parenthesis holds tarfile's own reason ("invalid header" on CPython 3.8-3.13)
    assert error.startswith(f"unreadable sparse tar member header at byte {header} (") and error.endswith(")")


def test_a_tar_swapped_for_its_gzip_after_listing_is_not_decompressed(tmp_path):
    tar, _ = _sparse_image_tar(tmp_path)
    batch = _batch([tar])
    tar.write_bytes(gzip.compress(tar.read_bytes()))
    out = ReadDecode(CFG)(batch)
    got = _rows(out, batch)["s"]
    assert got[:2] == (False, "read")
    assert got[2].startswith("unreadable sparse tar member header at byte 0 (")


def test_a_sparse_member_read_short_is_a_read_failure_row(tmp_path, monkeypatch):
    """tarfile raises on a member cut short; a reader returning fewer bytes is still caught."""
    tar, data = _sparse_image_tar(tmp_path)
    batch = _batch([tar])
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(
        tarfile.TarFile,
        "extractfile",
        lambda self, m: io.BytesIO(b"short") if m.issparse() else real(self, m),
    )
    out = ReadDecode(CFG)(batch)
    wanted = f"sparse tar member is truncated: wanted {len(data)} bytes, got 5"
    assert _rows(out, batch) == {"s": (False, "read", wanted, None), "p": (True, None, None, None)}


# --------------------------------------------------------------------------- read failures
def test_files_and_tars_gone_after_listing_are_read_failure_rows(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("ok.jpg", "dir.jpg", "gone.jpg"):
        (folder / name).write_bytes(image_bytes(len(name)))
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        _add(t, "m.jpg", image_bytes(9))
        _add(t, "m.txt", b"cap")
    batch = _batch([folder, tar])
    (folder / "dir.jpg").unlink()
    (folder / "dir.jpg").mkdir()
    (folder / "gone.jpg").unlink()
    tar.unlink()
    out = ReadDecode(CFG)(batch)
    assert _rows(out, batch) == {
        "dir.jpg": (False, "read", "cannot read file: not a regular file (a folder)", None),
        "gone.jpg": (False, "read", "cannot read file: cannot open: No such file or directory", None),
        "ok.jpg": (True, None, None, None),
        "m": (False, "read", "cannot read tar: No such file or directory", None),
    }


def test_unknown_kinds_plugin_readers_and_their_exceptions(tmp_path, monkeypatch):
    """A plug-in reader gets one dict of handles for the whole block; its exception is a read
    failure row of that image; a kind nobody reads is named."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(20 + i))
    batch = _batch([tmp_path])
    batch["kind"] = np.array(["blob", "boom", "blob", "mystery"], object)
    seen: list[int] = []

    def blob(row: dict, handles: dict) -> bytes:
        handles.setdefault("reads", []).append(row["key"])
        seen.append(id(handles))
        return Path(row["path"]).read_bytes()

    def boom(row: dict, handles: dict) -> bytes:
        raise RuntimeError("reader broke")

    readers = {"blob": blob, "boom": boom}
    monkeypatch.setattr(stages, "row_reader", readers.get)
    out = ReadDecode(CFG)(batch)
    assert _rows(out, batch) == {
        "0.jpg": (True, None, None, None),
        "1.jpg": (False, "read", "RuntimeError: reader broke", None),
        "2.jpg": (True, None, None, None),
        "3.jpg": (False, "read", "no reader for plan rows of kind 'mystery'", None),
    }
    assert len(seen) == 2 and seen[0] == seen[1]
    assert out["sha256"][2] == _sha(image_bytes(22))


def test_an_exception_while_decoding_is_a_decode_failure_row(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(image_bytes(1))

    def crash(data: bytes, cfg: PreprocessConfig):
        raise MemoryError("decoder ran out")

    monkeypatch.setattr(stages, "decode_one", crash)
    batch = _batch([tmp_path])
    out = ReadDecode(CFG)(batch)
    assert _rows(out, batch) == {"a.jpg": (False, "decode", "MemoryError: decoder ran out", None)}
    assert out["sha256"][0] == _sha(image_bytes(1))


def test_decode_applies_the_configured_pixel_limit(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes(1, size=(64, 48)))
    batch = _batch([tmp_path])
    out = ReadDecode(PreprocessConfig(image_size=16, max_pixels=1000))(batch)
    assert _rows(out, batch) == {
        "a.jpg": (False, "decode", "decompression bomb: 64x48 = 3072 pixels > limit 1000", None)
    }


def test_a_resize_that_fails_is_a_preprocess_failure_row(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes(1))
    batch = _batch([tmp_path])
    cfg = PreprocessConfig(image_size=0)
    out = ReadDecode(cfg)(batch)
    reason = "cannot preprocess: ValueError: height and width must be > 0"
    assert _rows(out, batch) == {"a.jpg": (False, "preprocess", reason, None)}
    with pytest.raises(ImageError) as e:
        resize_uint8(Image.new("RGB", (4, 3)), cfg)
    assert (e.value.stage, e.value.reason) == ("preprocess", reason)


# --------------------------------------------------------------------------- the decoded block
@pytest.mark.parametrize("resample", ["nearest", "bilinear"])
def test_the_decoded_block_against_pils_own_decode_and_resize(tmp_path, resample):
    sizes = [(64, 48), (40, 72), (50, 50)]
    datas = [image_bytes(30 + i, size=s) for i, s in enumerate(sizes)]
    for i, d in enumerate(datas):
        (tmp_path / f"{i}.jpg").write_bytes(d)
        (tmp_path / f"{i}.txt").write_text(f"cap {i}")
    idx = np.array([7, 3, 5])
    batch = _batch([tmp_path], idx=idx)
    cfg = PreprocessConfig(image_size=12, resample=resample)
    out = ReadDecode(cfg)(batch)
    assert set(out) == {
        "idx",
        "ok",
        "stage",
        "error",
        "sha256",
        "caption",
        "width",
        "height",
        "pixels",
        "t_read",
        "t_decode",
    }
    assert out["idx"].tolist() == [7, 3, 5] and out["ok"].tolist() == [True, True, True]
    assert out["width"].dtype == np.int32 and out["height"].dtype == np.int32
    assert out["width"].tolist() == [64, 40, 50] and out["height"].tolist() == [48, 72, 50]
    for k in ("stage", "error", "sha256", "caption"):
        assert out[k].dtype == object, k
    assert out["sha256"].tolist() == [_sha(d) for d in datas]
    assert out["caption"].tolist() == ["cap 0", "cap 1", "cap 2"]
    assert out["pixels"].dtype == np.uint8 and out["pixels"].shape == (3, 12, 12, 3)
    pil = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}[resample]
    for i, d in enumerate(datas):
        np.testing.assert_array_equal(out["pixels"][i], _pil_reference(d, 12, pil))


def test_parquet_cells_are_read_from_their_own_row_group(tmp_path):
    imgs = [image_bytes(40 + i) for i in range(5)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5)], "image": imgs}), path, row_group_size=2)
    batch = _batch([path])
    out = ReadDecode(CFG)(batch)
    direct = pq.read_table(path).column("image").to_pylist()
    assert out["ok"].tolist() == [True] * 5
    assert out["sha256"].tolist() == [_sha(b) for b in direct]


def test_read_and_decode_times_are_within_the_call(tmp_path, monkeypatch):
    for i in range(2):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
    batch = _batch([tmp_path])
    batch["kind"] = np.array(["slow", "slow"], object)

    def slow(row: dict, handles: dict) -> bytes:
        time.sleep(0.1)
        return Path(row["path"]).read_bytes()

    monkeypatch.setattr(stages, "row_reader", {"slow": slow}.get)
    t0 = time.perf_counter()
    out = ReadDecode(CFG)(batch)
    wall = time.perf_counter() - t0
    assert out["ok"].tolist() == [True, True]
    assert np.isfinite(out["t_read"]).all() and np.isfinite(out["t_decode"]).all()
    assert (out["t_read"] >= 0.1).all() and (out["t_decode"] >= 0).all()
    assert out["t_read"].sum() + out["t_decode"].sum() <= wall


def test_every_file_a_block_opens_is_closed_and_a_tar_is_opened_once(tmp_path, monkeypatch):
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(3):
            _add(t, f"{i}.jpg", image_bytes(i))
            _add(t, f"{i}.txt", f"c{i}".encode())
    opened: list[io.BufferedReader] = []

    def tracking_open(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        opened.append(f)
        return f

    monkeypatch.setattr(stages, "open", tracking_open, raising=False)
    batch = _batch([tar])
    out = ReadDecode(CFG)(batch)
    assert out["caption"].tolist() == ["c0", "c1", "c2"] and out["ok"].all()
    assert len(opened) == 1 and all(f.closed for f in opened)


# --------------------------------------------------------------------------- the encode actor
def _decoded_folder(root: Path, n: int, cfg: PreprocessConfig, bad: bool = True) -> tuple[Batch, list[bytes]]:
    """``n`` JPEGs (and one file that is not an image, last) decoded by the read stage."""
    root.mkdir()
    datas = [image_bytes(50 + i, size=(80 + 9 * i, 60 + 4 * i)) for i in range(n)]
    for i, d in enumerate(datas):
        (root / f"{i}.jpg").write_bytes(d)
    if bad:
        (root / "9bad.jpg").write_bytes(b"not an image")
    return ReadDecode(cfg)(_batch([root])), datas


@pytest.fixture
def tok_cfg(tiny_tokenizer) -> PreprocessConfig:
    return tiny_tokenizer.preprocess_config()


class _TimedEngine:
    """The real engine, recording how long its calls took (at least ``delay`` seconds each)."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay, self.spent = engine, delay, 0.0

    def __call__(self, x):
        t0 = time.perf_counter()
        time.sleep(self.delay)
        codes = self.engine(x)
        self.spent = time.perf_counter() - t0
        return codes


def test_encoder_output_block_and_per_image_time(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, tok_cfg):
    enc = Encoder(TokenizerBuilder(str(tiny_tokenizer_dir)))
    enc.engine = engine = _TimedEngine(enc.engine, 0.05)
    for n, bad in ((3, True), (1, False)):
        block, datas = _decoded_folder(tmp_path / f"b{n}", n, tok_cfg, bad)
        t0 = time.perf_counter()
        res = enc(block)
        wall = time.perf_counter() - t0
        rows = len(block["ok"])
        assert set(res) == (set(block) - {"pixels"}) | {"codes", "t_encode"}
        assert res["ok"].tolist() == block["ok"].tolist()
        ref = tiny_tokenizer.encode_images(datas).numpy().reshape(n, -1)
        assert res["codes"].dtype == np.uint16 and res["codes"].shape == (rows, ref.shape[1])
        np.testing.assert_array_equal(res["codes"][:n].astype(np.int64), ref)
        assert not res["codes"][n:].any()
        t = res["t_encode"]
        assert t.dtype == np.float64 and t.shape == (rows,) and np.all(t == t[0])
        assert engine.spent <= t.sum() <= wall  # the batch time, spread over its rows


def test_builder_chunks_and_compile_reach_the_engine(
    tmp_path, tiny_tokenizer, tiny_tokenizer_dir, tok_cfg, monkeypatch
):
    compiled: list[str] = []

    def fake_compile(module, backend="inductor", dynamic=None):
        compiled.append(backend)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    enc = Encoder(TokenizerBuilder(str(tiny_tokenizer_dir), compile=True, chunks=2))
    assert compiled == ["inductor"]
    sizes: list[int] = []
    real = enc.tok.quantize

    def quantize(feats, search_dtype=None):
        sizes.append(feats.shape[0])
        return real(feats, search_dtype=search_dtype)

    enc.tok.quantize = quantize
    block, datas = _decoded_folder(tmp_path / "b", 3, tok_cfg, bad=False)
    res = enc(block)
    assert sizes == [2, 1]
    ref = tiny_tokenizer.encode_images(datas).numpy().reshape(3, -1)
    np.testing.assert_array_equal(res["codes"].astype(np.int64), ref)


def test_bfloat16_runs_the_tower_under_autocast(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, tok_cfg):
    enc = Encoder(TokenizerBuilder(str(tiny_tokenizer_dir), encoder_dtype="bfloat16"))
    out_dtypes: list[torch.dtype] = []
    enc.tok.encoder.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    block, datas = _decoded_folder(tmp_path / "b", 2, tok_cfg, bad=False)
    res = enc(block)
    assert out_dtypes == [torch.bfloat16]
    ref = tiny_tokenizer.encode_images(datas, dtype=torch.bfloat16).numpy().reshape(2, -1)
    np.testing.assert_array_equal(res["codes"].astype(np.int64), ref)


def test_builder_search_dtype_reaches_the_search(tmp_path, tiny_tokenizer_dir, tok_cfg):
    enc = Encoder(TokenizerBuilder(str(tiny_tokenizer_dir), search_dtype="no-such-dtype"))
    block, _ = _decoded_folder(tmp_path / "b", 1, tok_cfg, bad=False)
    with pytest.raises(ValueError, match="search_dtype must be one of"):
        enc(block)


def test_builder_threads_set_torch_threads(tiny_tokenizer_dir):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        TokenizerBuilder(str(tiny_tokenizer_dir), threads=1).build()
        assert torch.get_num_threads() == 1
        TokenizerBuilder(str(tiny_tokenizer_dir), threads=0).build()
        assert torch.get_num_threads() == 1  # 0: left as it is
    finally:
        torch.set_num_threads(before)
