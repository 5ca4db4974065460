"""asvr-train's handling of library output: the one-time DeepSpeed op build is announced,
DeepSpeed's and transformers' chatter stays out of a normal run."""

from __future__ import annotations

import pytest
import torch

from asvr.train import libraries


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shared-memory op is DeepSpeed's CPU backend")
def test_build_notice_only_before_the_op_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    notice = libraries.build_notice()
    assert notice is not None and notice.startswith("building DeepSpeed's CPU communication op")
    assert str(tmp_path) in notice and "once" in notice and "\n" not in notice
    built = tmp_path / libraries.SHM_OP
    built.mkdir()
    (built / f"{libraries.SHM_OP}.so").write_bytes(b"")
    assert libraries.build_notice() is None


def test_quiet_stdout_holds_prints_unless_verbose(capsys):
    with libraries.quiet_stdout(verbose=False):
        print("DeepSpeed op built successfully")
    assert capsys.readouterr().out == ""
    with libraries.quiet_stdout(verbose=True):
        print("shown")
    assert capsys.readouterr().out == "shown\n"
    with pytest.raises(RuntimeError), libraries.quiet_stdout(verbose=False):
        print("context of the error")
        raise RuntimeError("boom")
    assert capsys.readouterr().out == "context of the error\n"
