"""Folder and tar discovery on the cases a plausible one-line bug lets through (issue 24).

Every expectation is written out by hand from the files the test makes: the complete
list of plan rows (key, kind, error), so a row too many, a row missing or a changed
reason fails.  No Ray: ``discover`` and the read stage are called directly."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
from conftest import image_bytes

from asvr.pipeline.inputs.sources import SourceOptions, discover
from asvr.pipeline.job.stages import ReadDecode
from asvr.tokenizer.preprocess import PreprocessConfig

CFG = PreprocessConfig(image_size=16)
OUTSIDE = "symlink to a folder outside the input folder: not followed (pass that folder as an INPUT of its own)"


def _rows(*inputs) -> list[tuple]:
    plan, _ = discover([str(i) for i in inputs], SourceOptions())
    return [(r["key"], r["kind"], r["error"]) for r in plan.to_pylist()]


def _read(*inputs) -> dict[str, tuple]:
    """key -> (ok, stage, error, sha256) of the read stage over the whole plan."""
    plan, _ = discover([str(i) for i in inputs], SourceOptions())
    batch = {k: np.asarray(v, dtype=object) for k, v in plan.to_pydict().items()}
    batch["idx"] = np.arange(plan.num_rows)
    out = ReadDecode(CFG)(batch)
    return {
        k: (bool(out["ok"][i]), out["stage"][i], out["error"][i], out["sha256"][i])
        for i, k in enumerate(plan.column("key").to_pylist())
    }


# --------------------------------------------------------------------------- folders: linked sub-folders
def test_a_linked_folder_leaving_the_input_is_one_row_and_none_of_its_files(tmp_path):
    """``imgs/ext -> ../outside``: its image is never planned (nor read), and the link is a row."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "outside" / "deep").mkdir(parents=True)
    (tmp_path / "outside" / "secret.jpg").write_bytes(image_bytes(2))
    (tmp_path / "outside" / "deep" / "more.png").write_bytes(image_bytes(3, fmt="PNG"))
    os.symlink(tmp_path / "outside", tmp_path / "imgs" / "ext")
    assert _rows(tmp_path / "imgs") == [("a.jpg", "file", None), ("ext", "ignored", OUTSIDE)]
    # from a sub-folder, a relative link that climbs out
    (tmp_path / "imgs" / "sub").mkdir()
    os.symlink("../../outside", tmp_path / "imgs" / "sub" / "up")
    assert _rows(tmp_path / "imgs") == [
        ("a.jpg", "file", None),
        ("ext", "ignored", OUTSIDE),
        ("sub/up", "ignored", OUTSIDE),
    ]
    read = _read(tmp_path / "imgs")
    assert read["a.jpg"][0] and not read["ext"][0] and read["ext"][3] is None  # the link's files never opened


def test_a_linked_folder_inside_the_input_is_a_row_and_its_files_are_planned_once(tmp_path):
    """``imgs/alias -> real``: the files of ``real`` are planned once, under ``real/``; the link
    is an ``ignored`` row that says where its files are (before: no row at all)."""
    (tmp_path / "imgs" / "real" / "in").mkdir(parents=True)
    (tmp_path / "imgs" / "real" / "x.jpg").write_bytes(image_bytes(1))
    (tmp_path / "imgs" / "real" / "in" / "y.jpg").write_bytes(image_bytes(2))
    (tmp_path / "imgs" / ".hidden").mkdir()
    (tmp_path / "imgs" / ".hidden" / "z.jpg").write_bytes(image_bytes(3))
    os.symlink("real", tmp_path / "imgs" / "alias")
    os.symlink(tmp_path / "imgs" / "real" / "in", tmp_path / "imgs" / "deep")  # absolute, still inside
    os.symlink("..", tmp_path / "imgs" / "real" / "loop")  # the input folder itself: a loop if walked
    os.symlink(".hidden", tmp_path / "imgs" / "peek")
    os.symlink("real", tmp_path / "imgs" / ".dotlink")  # dotfiles are skipped, links too
    planned = "of this input: not followed (its files are planned under their own path)"
    assert _rows(tmp_path / "imgs") == [
        ("alias", "ignored", f"symlink to the folder 'real' {planned}"),
        ("deep", "ignored", f"symlink to the folder 'real/in' {planned}"),
        (
            "peek",
            "ignored",
            "symlink to the hidden folder '.hidden' of this input: not followed (dotfiles are skipped)",
        ),
        ("real/x.jpg", "file", None),
        ("real/loop", "ignored", f"symlink to the folder '.' {planned}"),
        ("real/in/y.jpg", "file", None),
    ]


def test_a_linked_folder_is_accounted_for_in_the_plan_count(tmp_path):
    """Every entry of the folder (file or linked folder) is one plan row: os.walk's own listing
    (links not followed) is the reference count."""
    (tmp_path / "imgs" / "d").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    for i, rel in enumerate(["a.jpg", "b.txt", "d/c.png", "d/c.txt", "notes.md"]):
        (tmp_path / "imgs" / rel).write_bytes(image_bytes(i) if rel.endswith(("jpg", "png")) else b"x")
    os.symlink(tmp_path / "out", tmp_path / "imgs" / "d" / "o")
    os.symlink("d", tmp_path / "imgs" / "e")
    entries = 0
    for dirpath, dirnames, filenames in os.walk(tmp_path / "imgs"):
        entries += len(filenames) + sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
    rows = _rows(tmp_path / "imgs")
    captions = 1  # d/c.txt is c.png's caption, not a row of its own
    assert len(rows) == entries - captions == 6
    assert [k for k, kind, _ in rows if kind == "ignored"] == ["b.txt", "notes.md", "e", "d/o"]


# --------------------------------------------------------------------------- tars: cut at a member boundary
def _tar(path, n) -> list[int]:
    """A tar of ``k0.jpg``... and the header offset of each member (and of the end marker)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            data = image_bytes(i)
            ti = tarfile.TarInfo(f"k{i}.jpg")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        end = tar.offset
    path.write_bytes(buf.getvalue())
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()] + [end]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_tar_cut_exactly_at_a_member_boundary_is_an_input_failure_row(tmp_path, cut):
    """Cut where member ``cut`` (or, for 3, the end marker) would start: tarfile lists the whole
    members before it and stops without an error; the missing end marker is the only sign."""
    p = tmp_path / "a.tar"
    offsets = _tar(p, 3)
    p.write_bytes(p.read_bytes()[: offsets[cut]])
    msg = f"{p}: tar ends at byte {offsets[cut]} without the end-of-archive marker: it is truncated"
    assert _rows(p) == [(f"k{i}", "tar", None) for i in range(cut)] + [("a.tar#truncated", "input", msg)]
    read = _read(p)
    for i in range(cut):  # the whole members before the cut are read, byte for byte
        assert read[f"k{i}"][:3] == (True, None, None)
        assert read[f"k{i}"][3] == hashlib.sha256(image_bytes(i)).hexdigest()
    assert read["a.tar#truncated"][:3] == (False, "input", msg)


def test_a_tar_with_its_end_marker_or_cut_inside_a_member_or_the_marker(tmp_path):
    p = tmp_path / "a.tar"
    offsets = _tar(p, 2)
    whole = p.read_bytes()
    assert _rows(p) == [("k0", "tar", None), ("k1", "tar", None)]  # intact: no input row
    p.write_bytes(whole[: offsets[2] + 512])  # one of the two zero blocks: tarfile's own end
    assert _rows(p) == [("k0", "tar", None), ("k1", "tar", None)]
    p.write_bytes(whole[: offsets[2] + 100])  # cut inside the first zero block
    assert _rows(p)[-1] == (
        "a.tar#truncated",
        "input",
        f"{p}: tar is cut inside a member header at byte {offsets[2]}: it is truncated, later members are lost",
    )
    p.write_bytes(whole[: offsets[1] + 512 + 10])  # k1's header whole, its data cut after 10 bytes
    rows = _rows(p)
    assert rows[:2] == [("k0", "tar", None), ("k1", "tar", None)] and rows[2][1] == "input"
    read = _read(p)
    size = len(image_bytes(1))
    assert read["k0"][0] and read["k1"][:3] == (
        False,
        "read",
        f"tar is truncated: wanted {size} bytes at offset {offsets[1] + 512}, got 10",
    )
