"""Input discovery rules the source tests left open (issue 24, mutation survivors of
``sources``): option checks and their messages, the plan row of a file name that is not
UTF-8, the plan table's schema, the reader registry's reserved kinds, the size limit's
edge, and INPUT expansion (globs, braces, a path that merely looks odd, the format given
instead of detected).  References: hand-written expected rows and messages, ``os.listdir``
and the files the tests write.
"""

from __future__ import annotations

import io
import os
import tarfile

import pyarrow as pa
import pytest

from asvr.pipeline.inputs.sources import (
    PLAN_SCHEMA,
    InputFormat,
    SourceError,
    SourceOptions,
    _file_size_error,
    _format_names,
    _megabytes,
    _pick,
    _Rows,
    discover,
    expand_inputs,
    input_formats,
    register_input_format,
    row_reader,
    too_big,
)


def test_max_read_mb_is_mebibytes():
    assert _megabytes("8") == 8 * 1024 * 1024
    assert _megabytes("0.5") == 512 * 1024
    assert _megabytes("1") == 1048576


def test_option_checks_and_their_messages():
    assert SourceOptions(max_read_bytes=1).max_read_bytes == 1  # one byte is a (tiny) limit, not an error
    with pytest.raises(SourceError) as e:
        SourceOptions(max_read_bytes=0)
    assert str(e.value) == "--max-read-mb must be > 0"
    names = ["auto", *input_formats()]
    assert _format_names() == names and names[:5] == ["auto", "folder", "webdataset", "parquet", "llava"]
    with pytest.raises(SourceError) as e:
        SourceOptions(input_format="zip")
    assert str(e.value) == f"--input-format must be one of {', '.join(names)}, got 'zip'"


def _row(table: pa.Table, i: int = 0) -> dict:
    return {k: v[i] for k, v in table.to_pydict().items()}


def test_a_file_name_that_is_not_utf8_is_an_error_row_with_nothing_of_the_file():
    rows = _Rows()
    bad = "img\udcff.jpg"  # os.fsdecode(b"img\xff.jpg")
    rows.add(bad, "/in/" + bad, "file", path="/in/" + bad, offset=3, size=4, cap_offset=5, cap_size=6)
    rows.add(bad, "/in", "ignored", cap_kind="txt", caption="c", error="not an image")
    rows.add("ok.jpg", "/in", "file", path="/in/ok.jpg", size=9, cap_kind="txt", caption="a cat")
    rows.add("x.jpg", "/in", "error", error="unreadable")  # no path given: the empty path
    t = rows.table()
    assert t.schema == PLAN_SCHEMA
    assert _row(t, 0) == {
        "key": "img\\xff.jpg",
        "source": "/in/img\\xff.jpg",
        "kind": "error",
        "path": "",
        "offset": -1,
        "size": -1,
        "cap_offset": -1,
        "cap_size": -1,
        "cap_kind": "",
        "caption": None,
        "image_column": None,
        "error": "file name is not valid UTF-8 (keys are UTF-8 strings); rename the file",
    }
    ignored = _row(t, 1)  # an ignored file stays ignored, its own reason kept
    assert (ignored["kind"], ignored["error"], ignored["key"], ignored["cap_kind"], ignored["caption"]) == (
        "ignored",
        "not an image",
        "img\\xff.jpg",
        "",
        None,
    )
    good = _row(t, 2)
    assert (good["path"], good["offset"], good["size"], good["cap_kind"], good["caption"]) == (
        "/in/ok.jpg",
        -1,
        9,
        "txt",
        "a cat",
    )
    assert (_row(t, 3)["path"], _row(t, 3)["offset"], _row(t, 3)["cap_kind"]) == ("", -1, "")


def test_an_empty_plan_has_the_plan_schema():
    assert _Rows().table().schema == PLAN_SCHEMA


@pytest.mark.parametrize("kind", ["file", "tar", "tar-sparse", "parquet", "error", "input", "ignored"])
def test_a_plugin_cannot_take_a_built_in_row_kind(kind):
    fmt = InputFormat(name=f"plug-{kind}", help="", scan=lambda p, r, o: None, readers={kind: lambda row, h: b""})
    with pytest.raises(ValueError) as e:
        register_input_format(fmt)
    assert str(e.value) == f"input format 'plug-{kind}': row kind {kind!r} already has a reader"
    assert f"plug-{kind}" not in input_formats()


def test_built_in_kinds_have_no_plugin_reader():
    for kind in ("file", "tar", "tar-sparse", "parquet", "no-such-kind"):
        assert row_reader(kind) is None


def test_the_size_limit_is_inclusive_and_names_what_was_too_big(tmp_path):
    opts = SourceOptions(max_read_bytes=3 * 2**20)
    assert too_big(3 * 2**20, opts, "x") is None
    assert too_big(3 * 2**20 + 1, opts, "tar member 'a.jpg'") == (
        "tar member 'a.jpg' is 3.0 MiB, more than the 3 MiB one decode task reads (--max-read-mb)"
    )
    f = tmp_path / "big.jpg"
    f.write_bytes(b"\0" * 2000)
    small = SourceOptions(max_read_bytes=1000)
    assert _file_size_error(f, small) == (
        "the image file is 0.0 MiB, more than the 0 MiB one decode task reads (--max-read-mb)"
    )
    assert _file_size_error(f, SourceOptions(max_read_bytes=2000)) is None
    assert _file_size_error(tmp_path / "gone.jpg", small) is None  # the reader says why it cannot read it


def test_a_named_column_that_is_missing_lists_the_columns(tmp_path):
    with pytest.raises(SourceError) as e:
        _pick(["key", "jpg", "txt"], "png", ("image",), "image", tmp_path / "a.parquet")
    assert str(e.value) == f"{tmp_path / 'a.parquet'}: no image column 'png' (columns: key, jpg, txt)"
    assert _pick(["key", "jpg"], None, ("image", "jpg"), "image", tmp_path) == "jpg"
    assert _pick(["key"], None, ("image", "jpg"), "image", tmp_path) is None


def test_inputs_expand_globs_and_braces_in_order_and_each_must_exist(tmp_path):
    for name in ("b.tar", "a.tar", "c.txt", "shard-1.tar", "shard-2.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([str(tmp_path / "*.tar")]) == [
        tmp_path / n for n in sorted(os.listdir(tmp_path)) if n.endswith(".tar")
    ]
    assert expand_inputs([str(tmp_path / "shard-{2..1}.tar"), str(tmp_path / "c.txt")]) == [
        tmp_path / "shard-2.tar",
        tmp_path / "shard-1.tar",
        tmp_path / "c.txt",
    ]
    with pytest.raises(SourceError) as e:
        expand_inputs([str(tmp_path / "*.zip")])
    assert str(e.value) == f"input {str(tmp_path / '*.zip')!r} matches no file"
    missing = tmp_path / "NoX_file.tar"  # plain characters only: not a glob
    with pytest.raises(SourceError) as e:
        expand_inputs([str(missing)])
    assert str(e.value) == f"input {missing} does not exist"
    with pytest.raises(SourceError) as e:
        expand_inputs([])
    assert str(e.value) == "no INPUT given"


def _tar(path, names):
    with tarfile.open(path, "w") as tf:
        for n in names:
            data = n.encode()
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_a_given_format_is_used_as_given_and_described(tmp_path):
    path = tmp_path / "shard.bin"  # a tar under a name no format detects
    _tar(path, ["a.jpg", "b.jpg"])
    with pytest.raises(SourceError):
        discover([str(path)], SourceOptions())
    plan, described = discover([str(path)], SourceOptions(input_format="webdataset"))
    assert described == [{"path": str(path.absolute()), "format": "webdataset"}]
    assert plan.column("key").to_pylist() == ["a", "b"]
