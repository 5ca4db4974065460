"""``OutputDir`` without Ray: the lock, the run-config check and ``--overwrite``,
the half-written files of a killed run, unit commits (shard then marker), the
manifest and failures table, and the removal of shards beyond a shorter plan.
Every message is compared whole and every file against an independent
computation (hashlib, pyarrow, json), so that a changed word, a dropped count or
a file left behind fails a test (``make mutation``'s ``shards`` target)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from asvr.pipeline.output.writer import (
    FAILURE_SCHEMA,
    OutputDir,
    OutputError,
    UnitResult,
    _writing,
    shard_name,
    units_hash,
)
from asvr.core.shards import codes_array, read_shard, sha256_file
from test_shards_and_fingerprint import META, RUN, _rows, _write_out, as_rows


def _open(path, run=RUN, overwrite=False):
    return OutputDir(path, dict(run), overwrite=overwrite)


def _visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_shard_names_and_the_input_hash():
    assert shard_name(7, "parquet") == "part-00007.parquet"
    assert shard_name(123456, "webdataset") == "shard-123456.tar"
    keys, sources = ["a/b.jpg", "c\udcff.jpg"], ["s1", "s\udcfe"]  # non-UTF-8 file names survive as surrogates
    h = hashlib.sha256(b"a/b.jpg\0s1\nc\xed\xb3\xbf.jpg\0s\xed\xb3\xbe\n").hexdigest()
    assert units_hash(keys, sources) == h
    assert units_hash(["ab"], ["c"]) != units_hash(["a"], ["bc"])  # the separator is part of it


def test_a_failed_write_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(OutputError) as e, _writing(tmp_path / "x"):
        raise OSError("disk quota\nsecond line")
    assert str(e.value) == f"cannot write {tmp_path / 'x'}: disk quota; finished shards are kept, free space and rerun"
    out = _open(tmp_path / "out")
    (out.units_dir / "unit-00000.json").mkdir()  # the marker cannot replace a folder: IsADirectoryError
    with pytest.raises(OutputError) as e:
        out.commit_unit(0, "h", META, as_rows(_rows(["a"])), [], {})
    marker = out.units_dir / "unit-00000.json"
    assert str(e.value) == f"cannot write {marker}: Is a directory; finished shards are kept, free space and rerun"
    assert (tmp_path / "out" / "part-00000.parquet").exists()  # the shard step had finished
    out.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError) as e:
        _open(tmp_path / "file" / "out")
    assert str(e.value).startswith(f"cannot write {tmp_path / 'file' / 'out'}: Not a directory;")


def test_out_is_created_locked_and_refused_when_it_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError) as e:
        _open(tmp_path / "f")
    assert str(e.value) == f"--out {tmp_path / 'f'} exists and is not a folder"
    out = _open(tmp_path / "a" / "b")  # parents created
    assert (tmp_path / "a" / "b" / ".lock").is_file() and (tmp_path / "a" / "b" / ".units").is_dir()
    with pytest.raises(OutputError) as e:
        _open(tmp_path / "a" / "b")
    assert str(e.value) == f"{tmp_path / 'a' / 'b'} is being written by another asvr-pipeline run"
    out.close()
    _open(tmp_path / "a" / "b").close()  # the lock went with the first run
    _open(tmp_path / "a" / "b").close()  # and a refused run does not keep it either


def test_a_killed_runs_temp_files_are_removed_and_nothing_else(tmp_path):
    _write_out(tmp_path)
    tmps = [tmp_path / ".part-00002.parquet.tmp-x1", tmp_path / ".units" / ".unit-00002.json.tmp-y"]
    keep = [tmp_path / "notes.txt", tmp_path / ".hidden", tmp_path / ".units" / "unit-00009.txt"]
    for p in tmps + keep:
        p.write_text("half")
    _open(tmp_path).close()
    assert [p for p in tmps if p.exists()] == []
    assert all(p.exists() for p in keep)


def test_resume_accepts_the_same_settings_and_names_every_changed_one(tmp_path):
    _write_out(tmp_path)
    _open(tmp_path).close()  # same settings: a resume
    with pytest.raises(OutputError) as e:
        OutputDir(tmp_path, dict(RUN, shard_size=4, preprocess="pad", extra=True))  # no --overwrite by default
    assert str(e.value) == (
        f"{tmp_path} was written with other settings (shard_size 3 -> 4, preprocess 'square' -> 'pad', "
        "extra None -> True); pass --overwrite to replace it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        ".units",
        "failures.parquet",
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
    ]  # refused: nothing removed


@pytest.mark.parametrize("text,why", [("{", "Expecting property name"), ('{"complete": true}', "'run'")])
def test_an_unreadable_manifest_is_refused(tmp_path, text, why):
    _write_out(tmp_path)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(OutputError) as e:
        _open(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'manifest.json'} is unreadable (") and why in msg
    assert msg.endswith("); pass --overwrite to start again")


@pytest.mark.parametrize("name", ["part-00003.parquet", "shard-00000.tar", "failures.parquet"])
def test_shards_without_a_manifest_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / "other.parquet").write_bytes(b"x")
    with pytest.raises(OutputError) as e:
        _open(tmp_path)
    assert str(e.value) == f"{tmp_path} holds shards but no manifest.json; pass --overwrite to replace them"


def test_a_folder_of_other_files_is_usable(tmp_path):
    for name in ("other.parquet", "part-1.txt", "shard.tar"):
        (tmp_path / name).write_bytes(b"x")
    _open(tmp_path).close()
    assert not (tmp_path / "manifest.json").exists()


def test_overwrite_removes_our_files_only(tmp_path):
    _write_out(tmp_path)
    (tmp_path / "shard-00004.tar").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    out = _open(tmp_path, dict(RUN, shard_size=9), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".units", "notes.txt"]
    assert list(out.units_dir.iterdir()) == []
    assert out.done(0, units_hash(["a", "b", "c"], ["src"] * 3)) is None
    out.close()
    _open(tmp_path / "fresh", overwrite=True).close()  # nothing to remove yet


def test_each_write_that_fails_names_its_file(tmp_path):
    out = _open(tmp_path)
    why = "Is a directory; finished shards are kept, free space and rerun"
    (tmp_path / "part-00000.parquet").mkdir()
    with pytest.raises(OutputError) as e:
        out.commit_unit(0, "h", META, as_rows(_rows(["a"])), [], {})
    assert str(e.value) == f"cannot write {tmp_path / 'part-00000.parquet'}: {why}"
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(OutputError) as e:
        out.write_manifest([], None, 1)
    assert str(e.value) == f"cannot write {tmp_path / 'manifest.json'}: {why}"
    (tmp_path / "failures.parquet").mkdir()
    with pytest.raises(OutputError) as e:
        out.write_manifest([], [], 1)
    assert str(e.value) == f"cannot write {tmp_path / 'failures.parquet'}: {why}"
    out.close()


def test_commit_writes_the_rows_then_a_marker_that_records_them(tmp_path):
    out = _open(tmp_path)
    rows = _rows(["k1", "k2"], seed=3)
    rows["codes"] = rows["codes"].reshape(2, 2, 2, 2)  # [N, H, W, D] is flattened per row
    rows["caption"] = ["a cat", None]
    fails = [{"key": "k3", "source": "s", "stage": "decode", "error": "broken"}]
    counts = {"seen": 3, "encoded": 2, "failed": 1}
    r = out.commit_unit(4, "h4", META, as_rows(rows), fails, counts)
    path = tmp_path / "part-00004.parquet"
    assert r == UnitResult(4, "h4", "part-00004.parquet", 2, sha256_file(path), path.stat().st_size, fails, counts)
    assert json.loads(out.marker_path(4).read_text()) == {
        "unit": 4,
        "items_sha256": "h4",
        "shard": "part-00004.parquet",
        "rows": 2,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "failures": fails,
        "counts": counts,
    }
    meta, table = read_shard(path)
    assert meta == META
    assert table.column("key").to_pylist() == ["k1", "k2"]
    np.testing.assert_array_equal(codes_array(table, meta), rows["codes"])
    assert table.column("caption").to_pylist() == ["a cat", None]
    assert table.column("width").to_pylist() == [64, 64] and table.column("height").to_pylist() == [48, 48]
    assert out.done(4, "h4") == r
    out.close()


def test_an_empty_unit_removes_the_shard_of_an_earlier_run(tmp_path):
    out = _open(tmp_path)
    out.commit_unit(0, "h", META, as_rows(_rows(["a"])), [], {"seen": 1, "encoded": 1})
    fails = [{"key": "a", "source": "s", "stage": "decode", "error": "now unreadable"}]
    r = out.commit_unit(0, "h2", META, as_rows(_rows([])), fails, {"seen": 1, "failed": 1})
    assert r == UnitResult(0, "h2", None, 0, None, 0, fails, {"seen": 1, "failed": 1})
    assert not (tmp_path / "part-00000.parquet").exists()
    assert out.done(0, "h2") == r  # no shard to check: the marker alone says done
    out.commit_unit(1, "h", META, as_rows(_rows([])), [], {})  # nothing to remove: no error
    out.close()


def test_webdataset_units_write_tars(tmp_path):
    out = _open(tmp_path, dict(RUN, format="webdataset"))
    r = out.commit_unit(2, "h", META, as_rows(_rows(["a", "b"])), [], {})
    assert r.shard == "shard-00002.tar" and r.sha256 == sha256_file(tmp_path / "shard-00002.tar")
    assert read_shard(tmp_path / "shard-00002.tar")[1].column("key").to_pylist() == ["a", "b"]
    out.close()


@pytest.mark.parametrize(
    "marker",
    [
        "{",  # torn
        '{"unit": 0}',  # fields missing
        None,  # other fields (TypeError)
    ],
)
def test_a_damaged_marker_means_redo(tmp_path, marker):
    out = _open(tmp_path)
    r = out.commit_unit(0, "h", META, as_rows(_rows(["a"])), [], {})
    if marker is None:
        marker = json.dumps(dict(r.__dict__, extra=1))
    out.marker_path(0).write_text(marker)
    assert out.done(0, "h") is None
    out.close()


def test_a_marker_whose_shard_is_gone_or_resized_means_redo(tmp_path):
    out = _open(tmp_path)
    r = out.commit_unit(0, "h", META, as_rows(_rows(["a", "b"])), [], {})
    shard = tmp_path / r.shard
    data = shard.read_bytes()
    shard.write_bytes(data + b"\0")
    assert out.done(0, "h") is None
    shard.write_bytes(data)
    assert out.done(0, "h") == r
    shard.unlink()
    assert out.done(0, "h") is None
    out.close()


def _result(unit, rows, counts, failures=()):
    return UnitResult(
        unit, "h", f"part-{unit:05d}.parquet" if rows else None, rows, "s" * 64, 10, list(failures), counts
    )


def test_manifest_at_the_start_and_at_the_end(tmp_path):
    out = _open(tmp_path)
    inputs = [{"path": "imgs", "format": "folder"}]
    start = out.write_manifest(inputs, None, 3)
    expected = {
        "version": 1,
        "complete": False,
        "run": RUN,
        "fingerprint": RUN["fingerprint"],
        "inputs": inputs,
        "units": 3,
        "shards": [],
        "counts": {"seen": 0, "encoded": 0, "failed": 0, "duplicate": 0, "ignored": 0},
    }
    assert start == expected
    assert (tmp_path / "manifest.json").read_text() == json.dumps(expected, indent=2) + "\n"
    assert not (tmp_path / "failures.parquet").exists()  # written with the final manifest only

    f1 = {"key": "x", "source": "s", "stage": "decode", "error": "bad", "extra": "dropped"}
    f2 = {"key": "y", "source": "t", "stage": "duplicate", "error": "same as a"}
    f3 = {"key": "z.txt", "source": "t", "stage": "ignored", "error": "not an image"}
    results = [
        _result(0, 3, {"seen": 4, "encoded": 3, "failed": 1}, [f1]),
        _result(1, 0, {"seen": 1, "duplicate": 1, "ignored": 1}, [f2, f3]),
        _result(2, 2, {"seen": 2, "encoded": 2}),
    ]
    end = out.write_manifest(inputs, results, 3)
    expected.update(
        complete=True,
        shards=[
            {"file": "part-00000.parquet", "rows": 3, "sha256": "s" * 64},
            {"file": "part-00002.parquet", "rows": 2, "sha256": "s" * 64},
        ],
        counts={"seen": 7, "encoded": 5, "failed": 1, "duplicate": 1, "ignored": 1},
    )
    assert end == expected
    assert json.loads((tmp_path / "manifest.json").read_text()) == expected
    fails = pq.read_table(tmp_path / "failures.parquet")
    assert fails.schema.equals(FAILURE_SCHEMA)
    assert fails.to_pylist() == [{k: f[k] for k in ("key", "source", "stage", "error")} for f in (f1, f2, f3)]
    out.close()


def test_the_final_manifest_removes_units_beyond_a_shorter_plan(tmp_path):
    out = _open(tmp_path)
    results = [
        out.commit_unit(u, "h", META, as_rows(_rows([f"k{u}"])), [], {"seen": 1, "encoded": 1}) for u in range(3)
    ]
    (tmp_path / "shard-00000.tar").write_bytes(b"x")  # another format's shard of unit 0
    for name in ("part-0000x.parquet", "notes.parquet"):
        (tmp_path / name).write_bytes(b"x")
    (out.units_dir / "unit-abc.json").write_text("{}")
    out.write_manifest([], results[:2], 2)  # this run's plan: two units
    assert _visible(tmp_path) == [
        "failures.parquet",
        "manifest.json",
        "notes.parquet",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-0000x.parquet",
    ]
    assert sorted(p.name for p in out.units_dir.iterdir()) == ["unit-00000.json", "unit-00001.json", "unit-abc.json"]
    out.close()


def test_webdataset_output_drops_parquet_shards_of_its_units(tmp_path):
    out = _open(tmp_path, dict(RUN, format="webdataset"))
    r = out.commit_unit(0, "h", META, as_rows(_rows(["a"])), [], {"seen": 1, "encoded": 1})
    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    out.write_manifest([], [r], 1)
    assert _visible(tmp_path) == ["failures.parquet", "manifest.json", "shard-00000.tar"]
    out.close()


def test_no_failures_is_an_empty_table_with_the_schema(tmp_path):
    out = _open(tmp_path)
    out.write_manifest([], [_result(0, 2, {"seen": 2, "encoded": 2})], 1)
    fails = pq.read_table(tmp_path / "failures.parquet")
    assert fails.num_rows == 0 and fails.schema.equals(FAILURE_SCHEMA)
    out.close()
