"""Input discovery and CLI errors (no Ray): keys, order, captions, traversal, formats."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_image_folder

from asvr.pipeline.cli import main
from asvr.pipeline.inputs.sources import SourceError, SourceOptions, discover


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def test_folder_keys_are_relative_posix_sorted_with_sidecar_captions(tmp_path):
    keys = write_image_folder(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "d0" / "img_00000.txt").write_text(" a red thing \n")
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.jpg").write_bytes(image_bytes(9))
    plan, inputs = discover([str(tmp_path / "imgs")], SourceOptions())
    kinds = dict(zip(plan.column("key").to_pylist(), plan.column("kind").to_pylist()))
    assert kinds.pop("notes.md") == "ignored"  # counted and listed, not an input image; the caption is not
    assert list(kinds) == sorted(keys)
    plan = plan.filter(pa.compute.not_equal(plan.column("kind"), "ignored"))
    assert inputs[0]["format"] == "folder"
    caps = dict(zip(plan.column("key").to_pylist(), plan.column("caption").to_pylist()))
    assert caps["d0/img_00000.jpg"] == "a red thing"
    assert caps["d1/img_00001.jpg"] is None


def test_folder_symlink_out_of_root_is_an_error_row(tmp_path):
    write_image_folder(tmp_path / "imgs", 1, sub=False)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes(1))
    os.symlink(secret, tmp_path / "imgs" / "link.jpg")
    plan, _ = discover([str(tmp_path / "imgs")], SourceOptions())
    rows = {r["key"]: r for r in plan.to_pylist()}
    assert rows["link.jpg"]["kind"] == "error" and "outside" in rows["link.jpg"]["error"]


def test_tar_keys_captions_and_hostile_names(tmp_path):
    p = tmp_path / "s-000.tar"
    with tarfile.open(p, "w") as tar:
        add_member(tar, "a/x1.jpg", image_bytes(1))
        add_member(tar, "a/x1.txt", b"caption one")
        add_member(tar, "x2.png", image_bytes(2, fmt="PNG"))
        add_member(tar, "x2.json", json.dumps({"caption": "two"}).encode())
        add_member(tar, "../../evil.jpg", image_bytes(3))
        add_member(tar, "/abs/key.webp", image_bytes(4, fmt="WEBP"))
        add_member(tar, "textonly.txt", b"no image here")
        link = tarfile.TarInfo("linked.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    plan, inputs = discover([str(tmp_path / "s-{000..000}.tar")], SourceOptions())
    assert inputs[0]["format"] == "webdataset"
    rows = {r["key"]: r for r in plan.to_pylist() if r["kind"] != "ignored"}
    assert list(rows) == ["a/x1", "x2", "../../evil", "/abs/key", "linked"]
    ignored = {r["key"]: r["error"] for r in plan.to_pylist() if r["kind"] == "ignored"}
    assert ignored == {"textonly.txt": "its sample has no image member"}
    assert rows["a/x1"]["cap_kind"] == "txt" and rows["x2"]["cap_kind"] == "json"
    assert rows["linked"]["kind"] == "error" and "link" in rows["linked"]["error"]
    # bytes are addressed by offset inside the tar, never by the member name
    r = rows["../../evil"]
    with open(p, "rb") as f:
        f.seek(r["offset"])
        assert f.read(r["size"]) == image_bytes(3)


def test_parquet_columns_auto_and_explicit(tmp_path):
    t = pa.table({"id": ["k0", "k1"], "jpg": [image_bytes(0), image_bytes(1)], "text": ["c0", None]})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=1)
    plan, _ = discover([str(tmp_path / "a.parquet")], SourceOptions())
    assert plan.column("key").to_pylist() == ["k0", "k1"]
    assert plan.column("caption").to_pylist() == ["c0", None]
    assert plan.column("offset").to_pylist() == [0, 1]  # row group
    with pytest.raises(SourceError, match="no image column 'pixels'"):
        discover([str(tmp_path / "a.parquet")], SourceOptions(image_column="pixels"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match="--image-column"):
        discover([str(tmp_path / "b.parquet")], SourceOptions())


def test_llava_json_distinct_images_and_root_escape(tmp_path):
    root = tmp_path / "root"
    write_image_folder(root, 2, sub=False)
    (tmp_path / "outside.jpg").write_bytes(image_bytes(5))
    recs = [
        {"id": "1", "image": "img_00000.jpg", "conversations": []},
        {"id": "2", "image": "img_00000.jpg", "conversations": []},
        {"id": "3", "conversations": []},
        {"id": "4", "image": "../outside.jpg", "conversations": []},
        {"id": "5", "image": str(tmp_path / "outside.jpg"), "conversations": []},
        {"id": "6", "image": ["img_00001.jpg", "missing.jpg"], "conversations": []},
    ]
    j = tmp_path / "chat.json"
    j.write_text(json.dumps(recs))
    with pytest.raises(SourceError, match="--image-root"):
        discover([str(j)], SourceOptions())
    plan, _ = discover([str(j)], SourceOptions(image_root=str(root)))
    rows = {r["key"]: r for r in plan.to_pylist()}
    assert list(rows) == [
        "img_00000.jpg",
        "../outside.jpg",
        str(tmp_path / "outside.jpg"),
        "img_00001.jpg",
        "missing.jpg",
    ]
    assert "escapes" in rows["../outside.jpg"]["error"]
    assert "escapes" in rows[str(tmp_path / "outside.jpg")]["error"]
    assert "no such image" in rows["missing.jpg"]["error"]
    assert rows["img_00001.jpg"]["kind"] == "file"


def test_cli_one_line_errors(tmp_path, tiny_tokenizer_dir, capsys):
    write_image_folder(tmp_path / "imgs", 1)
    cases = [
        (
            ["tokenize", str(tmp_path / "nope"), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "o")],
            "does not exist",
        ),
        (
            ["tokenize", str(tmp_path / "imgs"), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")],
            "not a tokenizer directory",
        ),
        (
            ["tokenize", str(tmp_path / "x.zip"), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "o")],
            "does not exist",
        ),
        (
            [
                "tokenize",
                str(tmp_path / "imgs"),
                "--tokenizer",
                str(tiny_tokenizer_dir),
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
        (["inspect", str(tmp_path)], "no manifest.json"),
        (["verify", str(tmp_path)], "no manifest.json"),
    ]
    (tmp_path / "y.bin").write_bytes(b"x")
    cases.append(
        (
            ["tokenize", str(tmp_path / "y.bin"), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "o")],
            "cannot tell its format",
        )
    )
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, (argv, err)
    with pytest.raises(SystemExit) as e:
        main(["tokenize", str(tmp_path / "imgs"), "--tokenizer", "t", "--out", "o", "--format", "zip"])
    assert e.value.code == 2


def test_empty_input_completes_without_ray(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "empty"),
                "--tokenizer",
                str(tiny_tokenizer_dir),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["counts"] == {"seen": 0, "encoded": 0, "failed": 0, "duplicate": 0, "ignored": 0}
    assert main(["verify", str(out)]) == 0


def test_a_throwaway_plugin_format_is_listed_detected_planned_and_read_like_a_built_in(tmp_path):
    """What a module in ``asvr/pipeline/inputs/`` does: register an ``InputFormat``.  It is listed
    after the built-ins, accepted by ``--input-format``, asked before the built-ins' suffix rules
    (so it can claim a folder), planned by ``discover`` and its rows read by its own reader in the
    Ray read stage, while a plain folder is still a folder."""
    import numpy as np

    from asvr.pipeline.inputs.sources import FORMATS, InputFormat, detect_format, input_formats, register_input_format
    from asvr.pipeline.job.stages import ReadDecode
    from asvr.tokenizer.preprocess import PreprocessConfig

    def scan(path, rows, opts):
        for line in (path / "LIST").read_text().splitlines():
            rows.add(line, f"{path}:{line}", "test-list", str(path / "blobs" / line))

    def read(row, handles):
        return bytes(reversed(open(row["path"], "rb").read()))  # stored reversed: only this reader can read it

    register_input_format(
        InputFormat(
            "test-list",
            "a LIST of reversed blobs",
            scan,
            detect=lambda p: (p / "LIST").is_file(),
            readers={"test-list": read},
        )
    )
    try:
        assert list(input_formats())[:4] == ["folder", "webdataset", "parquet", "llava"]
        assert "test-list" in list(input_formats())[4:]
        SourceOptions(input_format="test-list")  # a valid --input-format
        ds = tmp_path / "ds"
        (ds / "blobs").mkdir(parents=True)
        (ds / "LIST").write_text("b\na\n")
        for k, seed in (("a", 1), ("b", 2)):
            (ds / "blobs" / k).write_bytes(bytes(reversed(image_bytes(seed))))
        (tmp_path / "plain").mkdir()
        assert detect_format(ds) == "test-list" and detect_format(tmp_path / "plain") == "folder"
        plan, described = discover([str(ds)], SourceOptions())
        assert described[0]["format"] == "test-list"
        assert plan.column("key").to_pylist() == ["b", "a"] and set(plan.column("kind").to_pylist()) == {"test-list"}
        batch = {k: np.asarray(v, dtype=object) for k, v in plan.to_pydict().items()}
        batch["idx"] = np.arange(plan.num_rows)
        out = ReadDecode(PreprocessConfig(image_size=16))(batch)
        assert out["ok"].tolist() == [True, True] and out["width"].tolist() == [96, 96]
        with pytest.raises(ValueError, match="registered twice"):
            register_input_format(InputFormat("folder", "again", scan))
    finally:
        FORMATS.unregister("test-list")
    with pytest.raises(SourceError, match="--input-format must be one of auto, folder, webdataset, parquet, llava"):
        SourceOptions(input_format="test-list")
