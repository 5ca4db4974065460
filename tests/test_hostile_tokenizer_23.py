"""Issue 23, tokenizer half: overwrites refused, foreign and damaged files one line, non-finite
codebooks refused.  Real artifacts, real safetensors/faiss/Parquet files; every message compared
whole.  No Ray."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tiny_tokenizer, write_image_folder
from safetensors.torch import load_file, save_file

from asvr.tokenizer.artifact import compute_fingerprint, load_artifact, save_artifact
from asvr.tokenizer.cli import main
from asvr.core.errors import TokenizerError
from asvr.core.shards import ShardMeta, rows_to_table, write_parquet_shard


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def tok(tmp_path):
    return build_tiny_tokenizer(tmp_path / "tok", depth=2, k=8)


def _codes(tmp_path, tok_dir, keys, seed=0):
    """A code folder of random (valid) codes made with ``tok_dir``."""
    spec, _ = load_artifact(tok_dir)
    meta = ShardMeta.from_spec(spec)
    out = tmp_path / f"codes{seed}"
    out.mkdir()
    codes = np.random.default_rng(seed).integers(0, spec.codebook_size, (len(keys), *spec.grid, spec.depth))
    n = len(keys)
    table = rows_to_table(meta, keys, codes, ["0" * 64] * n, [8] * n, [8] * n, [None] * n)
    write_parquet_shard(out / "part-00000.parquet", table)
    return out


# --------------------------------------------------------------------------- 3: overwrites
def test_train_and_import_refuse_to_replace_a_tokenizer(tok, tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", 2)
    before = {p.name: p.read_bytes() for p in tok.iterdir()}
    fp = json.loads((tok / "tokenizer.json").read_text())["fingerprint"][:12]
    want = (
        f"--out {tok} already holds the tokenizer {fp}; replacing it makes every shard, index and run made "
        "with it unusable: pass --overwrite to replace it, or choose another --out"
    )
    train = ["train", "--images", str(tmp_path / "imgs"), "--depth", "1", "--codebook-size", "4", "--out", str(tok)]
    assert main(train) == 2  # before: rc 0, the old tokenizer replaced
    assert _one_line(capsys) == f"asvr-tokenizer train: error: {want}"
    imp = ["import-dualtoken", "--config", "c", "--checkpoint", "x.pt", "--siglip", "s", "--out", str(tok)]
    assert main(imp) == 2
    assert _one_line(capsys) == f"asvr-tokenizer import-dualtoken: error: {want}"
    assert {p.name: p.read_bytes() for p in tok.iterdir()} == before  # nothing touched
    assert main([*train, "--threads", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert load_artifact(tok)[0].fingerprint[:12] != fp


def test_index_refuses_an_existing_index_and_force_rebuilds(tok, tmp_path, capsys):
    codes = _codes(tmp_path, tok, [f"k{i}" for i in range(6)])
    idx = tmp_path / "idx"
    base = ["index", str(codes), "--tokenizer", str(tok), "--out", str(idx), "--quiet"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base) == 2
    assert _one_line(capsys) == (
        f"asvr-tokenizer index: error: {idx} already holds an index (use --add for new shards, --force to rebuild)"
    )
    assert main([*base, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 6


# --------------------------------------------------------------------------- 4: a Hugging Face text tokenizer folder
def test_validate_on_a_text_tokenizer_folder_says_what_it_is(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    hf = tmp_path / "llm"
    hf.mkdir()
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(hf / "tokenizer.json"))
    write_image_folder(tmp_path / "imgs", 1)
    rc = main(["validate", str(hf), "--images", str(tmp_path / "imgs"), "--report", str(tmp_path / "rep")])
    assert rc == 2  # before: "tokenizer format_version None is not 1"
    assert _one_line(capsys) == (
        f"asvr-tokenizer validate: error: {hf} is not an ASVR tokenizer artifact (tokenizer.json has none of "
        "codebook_size, depth, encoder, format_version, grid; it is a Hugging Face text tokenizer's): "
        "pass the folder written by asvr-tokenizer train or import-dualtoken"
    )


# --------------------------------------------------------------------------- 11: damaged and foreign files
def test_truncated_codebooks_are_one_line_in_every_command(tok, tmp_path, capsys):
    from asvr.pipeline.cli import main as pipeline

    write_image_folder(tmp_path / "imgs", 1, sub=False)
    img = tmp_path / "imgs" / "img_00000.jpg"
    codes = _codes(tmp_path, tok, ["a", "b"])
    assert main(["index", str(codes), "--tokenizer", str(tok), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    capsys.readouterr()
    cbf = tok / "codebooks.safetensors"
    cbf.write_bytes(cbf.read_bytes()[:-200])
    with pytest.raises(Exception) as lib:  # what safetensors itself says about the cut file
        load_file(str(cbf))
    why = str(lib.value).splitlines()[0]
    want = f"{cbf}: unreadable ({type(lib.value).__name__}: {why}); the file is truncated or not safetensors"
    commands = {
        "validate": ["validate", str(tok), "--images", str(tmp_path / "imgs"), "--report", str(tmp_path / "r")],
        "encode": ["encode", str(tok), str(img)],
        "inspect": ["inspect", str(tok)],
        "index": ["index", str(codes), "--tokenizer", str(tok), "--out", str(tmp_path / "idx2"), "--quiet"],
        "search": ["search", str(tmp_path / "idx"), "--image", str(img)],
    }
    for name, argv in commands.items():  # before: a SafetensorError traceback in all five
        assert main(argv) == 2, name
        assert _one_line(capsys) == f"asvr-tokenizer {name}: error: {want}"
    rc = pipeline(["tokenize", str(tmp_path / "imgs"), "--tokenizer", str(tok), "--out", str(tmp_path / "o")])
    assert rc == 2 and _one_line(capsys) == f"asvr-pipeline tokenize: error: {want}"


def test_non_finite_codebooks_are_refused_at_save_and_load(tok, tmp_path):
    spec, cb = load_artifact(tok)
    bad = cb.clone()
    bad[1, 5, 7] = float("nan")
    bad[1, 6, 0] = float("inf")
    with pytest.raises(TokenizerError) as e:
        save_artifact(tmp_path / "new", spec, bad)
    where = tmp_path / "new" / "codebooks.safetensors"
    assert str(e.value) == (
        f"{where}: 2 codebook rows hold NaN or Inf values (first: depth 1, code 5); "
        "the codebook training diverged: train it again"
    )
    assert not where.exists()
    # a diverged file whose fingerprint was recomputed: the fingerprint check alone passes it
    spec.fingerprint = compute_fingerprint(spec, bad)
    save_file({"codebooks": bad}, str(tok / "codebooks.safetensors"))
    (tok / "tokenizer.json").write_text(json.dumps(spec.to_dict()))
    with pytest.raises(TokenizerError) as e:  # before: loaded, and changed most codes
        load_artifact(tok)
    assert str(e.value) == (
        f"{tok / 'codebooks.safetensors'}: 2 codebook rows hold NaN or Inf values (first: depth 1, code 5); "
        "the codebook training diverged: train it again"
    )


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("image_size", 10**6, "encoder image_size 1000000 is implausible (expected 8..4096 pixels)"),
        ("image_size", 0, "encoder image_size 0 is implausible (expected 8..4096 pixels)"),
        ("image_size", "224", "encoder image_size '224' is implausible (expected 8..4096 pixels)"),
        ("depth", -1, "depth -1 must be a positive integer"),
        ("grid", [7, 0], "grid [7, 0] must be two positive integers"),
        ("codebook_size", 70000, "codebook_size 70000 > 65536 (codes are stored as uint16)"),
    ],
)
def test_implausible_numbers_in_tokenizer_json_are_refused(tok, field, value, why):
    js = json.loads((tok / "tokenizer.json").read_text())
    if field == "image_size":
        js["encoder"]["image_size"] = value
    else:
        js[field] = value
    (tok / "tokenizer.json").write_text(json.dumps(js))
    with pytest.raises(TokenizerError) as e:  # before: image_size 1e6 resized every image to a 3 TB canvas
        load_artifact(tok)
    assert str(e.value) == f"{tok / 'tokenizer.json'}: {why}"


def test_bad_shards_given_to_index_and_inspect_are_one_line(tok, tmp_path, capsys):
    spec, _ = load_artifact(tok)
    codes = _codes(tmp_path, tok, ["a", "b", "c"])
    shard = codes / "part-00000.parquet"
    t = pq.read_table(shard)
    flat = t.column("codes").combine_chunks().values.to_numpy().copy()
    n = spec.grid[0] * spec.grid[1] * spec.depth
    flat[n + 3] = spec.codebook_size + 1  # key "b": a code >= K
    t = t.set_column(1, "codes", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint16()), n))
    pq.write_table(t, shard)
    want = f"{shard}: key 'b' has code {spec.codebook_size + 1} outside [0, 8) (codebook size); the shard is corrupt"
    assert main(["index", str(codes), "--tokenizer", str(tok), "--out", str(tmp_path / "idx"), "--quiet"]) == 2
    assert _one_line(capsys) == f"asvr-tokenizer index: error: {want}"  # before: a ShardError traceback
    assert main(["inspect", str(tok), "--codes", str(codes), "--quiet"]) == 2
    assert _one_line(capsys) == f"asvr-tokenizer inspect: error: {want}"
    shard.write_bytes(b"PAR1" + bytes(300) + b"PAR1")  # a corrupt shard
    assert main(["index", str(codes), "--tokenizer", str(tok), "--out", str(tmp_path / "idx"), "--quiet"]) == 2
    assert _one_line(capsys).startswith(f"asvr-tokenizer index: error: {shard}: unreadable code shard (")
    assert main(["inspect", str(tok), "--codes", str(codes), "--quiet"]) == 2
    assert _one_line(capsys).startswith(f"asvr-tokenizer inspect: error: {shard}: unreadable code shard (")


def _index(tmp_path, tok, name, keys, seed, capsys):
    codes = _codes(tmp_path, tok, keys, seed)
    idx = tmp_path / name
    assert main(["index", str(codes), "--tokenizer", str(tok), "--out", str(idx), "--quiet"]) == 0
    capsys.readouterr()
    return idx, json.loads((idx / "index.json").read_text())


def test_truncated_keys_and_foreign_faiss_files_are_refused(tok, tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", 1, sub=False)
    img = str(tmp_path / "imgs" / "img_00000.jpg")
    idx, meta = _index(tmp_path, tok, "idx", [f"k{i}" for i in range(6)], 0, capsys)
    other, ometa = _index(tmp_path, tok, "other", [f"o{i}" for i in range(6)], 1, capsys)  # same size and dim
    faiss_file, keys_file = idx / meta["index_file"], idx / meta["keys_file"]

    good = keys_file.read_bytes()
    keys_file.write_bytes(good[: len(good) // 2])
    assert main(["search", str(idx), "--key", "k0"]) == 2  # before: pyarrow's traceback
    assert _one_line(capsys) == (
        f"asvr-tokenizer search: error: {keys_file} is not the file index.json recorded (replaced or modified); "
        "rebuild the index with --force"
    )
    keys_file.write_bytes(good)

    shutil.copyfile(other / ometa["index_file"], faiss_file)
    for q in (["--key", "k0"], ["--image", img]):  # before: wrong neighbours / a faiss traceback
        assert main(["search", str(idx), *q]) == 2
        assert _one_line(capsys) == (
            f"asvr-tokenizer search: error: {faiss_file} is not the file index.json recorded (replaced or "
            "modified); rebuild the index with --force"
        )
    # an index written before digests were recorded: the dimension and count still have to match
    for k in ("index_digest", "keys_digest"):
        meta.pop(k)
    (idx / "index.json").write_text(json.dumps(meta))
    big, bmeta = _index(tmp_path, tok, "big", [f"b{i}" for i in range(9)], 2, capsys)
    shutil.copyfile(big / bmeta["index_file"], faiss_file)
    assert main(["search", str(idx), "--image", img]) == 2
    assert _one_line(capsys) == (
        f"asvr-tokenizer search: error: {faiss_file}: holds 9 vectors of dimension 320 and its keys file 6 rows, "
        "index.json says 6 of 320: not this index's files; rebuild it with --force"
    )
    keys_file.write_bytes(good[:100])
    assert main(["search", str(idx), "--key", "k0"]) == 2
    assert _one_line(capsys).startswith(f"asvr-tokenizer search: error: {keys_file}: unreadable (")


def test_an_unchanged_index_still_answers(tok, tmp_path, capsys):
    idx, meta = _index(tmp_path, tok, "idx", [f"k{i}" for i in range(6)], 0, capsys)
    assert len(meta["index_digest"]) == 64 and len(meta["keys_digest"]) == 64
    assert main(["search", str(idx), "--key", "k3", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["neighbours"][0]["key"] == "k3"


def test_digest_reads_head_and_tail_only(tmp_path):
    from asvr.tokenizer.codes.retrieval import DIGEST_SPAN, file_digest

    p = tmp_path / "f"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 * DIGEST_SPAN, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    h = hashlib.sha256(str(len(data)).encode() + b"\0" + data[:DIGEST_SPAN] + data[-DIGEST_SPAN:]).hexdigest()
    assert file_digest(p) == h
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    assert file_digest(p) != h


def test_codebooks_of_another_dtype_are_refused(tok):
    cbf = tok / "codebooks.safetensors"
    save_file({"codebooks": load_file(str(cbf))["codebooks"].double()}, str(cbf))
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == f"{cbf}: codebooks are {torch.float64}, expected float32"
