"""The one atomic-write helper: all or nothing, no leftovers, the user's umask."""

from __future__ import annotations

import os
import stat

import pytest

from asvr.core.atomic import atomic_dir, atomic_path, atomic_write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_write_replaces_and_leaves_no_temporary(tmp_path, umask_027):
    p = tmp_path / "a.json"
    p.write_text("old")
    assert atomic_write(p, "new ü") == p
    assert p.read_text(encoding="utf-8") == "new ü"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    # the permissions of a plain open() under this umask (mkstemp alone would give 0600)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o640


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with atomic_path(p) as tmp:
                tmp.write_text("half")
                raise exc()
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_suffix_and_temporary_name_pattern(tmp_path):
    with atomic_path(tmp_path / "x.png", suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.png.tmp-") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "x.png").read_bytes() == b"png"


def test_dir_replaces_a_whole_folder_or_nothing(tmp_path, umask_027):
    d = tmp_path / "export"
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("1")
    assert (d / "w").read_text() == "1" and stat.S_IMODE(d.stat().st_mode) == 0o750
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError
    assert (d / "w").read_text() == "1"
    with atomic_dir(d) as tmp:
        (tmp / "v").write_text("3")
    assert sorted(x.name for x in d.iterdir()) == ["v"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["export"]
