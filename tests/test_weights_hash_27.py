"""The encoder weights' hash remembered per file state (asvr.tokenizer.encoders.weights_hash): the
record is used while the files are unchanged, and any change -- new bytes of the same size
with the old mtime put back, a replacement by rename, a retargeted symlink -- hashes again,
so a tokenizer whose weights changed is still refused; files changed less than ``settle_s``
ago get no record (file times are coarse)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.artifact import TokenizerError
from asvr.tokenizer.encoders.base import _sha256_files
from asvr.tokenizer.encoders.weights_hash import _record_path, cache_dir, cached_digest, file_states


def _plain(paths: list[Path]) -> str:
    """Independent reference: the digest _sha256_files documents (names, then bytes, sorted)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _files(tmp_path: Path) -> list[Path]:
    w = tmp_path / "w"
    w.mkdir()
    (w / "a.safetensors").write_bytes(os.urandom(5000))
    (w / "b.safetensors").write_bytes(os.urandom(3000))
    return [w / "b.safetensors", w / "a.safetensors"]


def test_record_is_used_while_files_are_unchanged(tmp_path):
    files, cache = _files(tmp_path), tmp_path / "cache"
    assert cached_digest(files, _sha256_files, cache) == _plain(files)
    assert not cache.exists()  # just written: no record yet (racily clean)
    assert cached_digest(files, _sha256_files, cache, settle_s=0) == _plain(files)
    rec = _record_path(cache, file_states(files))
    assert rec.exists()
    # a forged digest for the same states is returned: the files were not read again
    saved = json.loads(rec.read_text())
    rec.write_text(json.dumps({**saved, "sha256": "f" * 64}))
    assert cached_digest(files, _sha256_files, cache, settle_s=0) == "f" * 64
    assert cached_digest(files, _sha256_files, None) == _plain(files)  # no cache: always hashed


def test_same_size_same_mtime_rewrite_is_hashed_again(tmp_path):
    files, cache = _files(tmp_path), tmp_path / "cache"
    first = cached_digest(files, _sha256_files, cache, settle_s=0)
    assert _record_path(cache, file_states(files)).exists()
    time.sleep(0.05)  # past the file clock's tick: the rewrite gets another ctime
    st = files[0].stat()
    files[0].write_bytes(os.urandom(st.st_size))  # new bytes, same size
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # old mtime back (ctime moves on)
    got = cached_digest(files, _sha256_files, cache, settle_s=0)
    assert got == _plain(files) != first


def test_replaced_by_rename_and_retargeted_symlink_are_hashed_again(tmp_path):
    files, cache = _files(tmp_path), tmp_path / "cache"
    first = cached_digest(files, _sha256_files, cache, settle_s=0)
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(5000))
    os.replace(new, files[1])  # a.safetensors is another inode now
    assert cached_digest(files, _sha256_files, cache, settle_s=0) == _plain(files) != first
    link = tmp_path / "w" / "c.safetensors"
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    t1.write_bytes(b"one" * 100)
    t2.write_bytes(b"two" * 100)
    link.symlink_to(t1)
    d1 = cached_digest([link], _sha256_files, cache, settle_s=0)
    link.unlink()
    link.symlink_to(t2)
    assert cached_digest([link], _sha256_files, cache, settle_s=0) == _plain([link]) != d1


def test_unwritable_cache_and_env_switches(tmp_path, monkeypatch):
    files = _files(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cached_digest(files, _sha256_files, blocker / "sub", settle_s=0) == _plain(
        files
    )  # cannot mkdir: just hashes
    monkeypatch.setenv("ASVR_HASH_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.setenv("ASVR_HASH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ASVR_HASH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "asvr" / "weights-sha256"


def test_tokenizer_with_changed_weights_is_refused_after_a_cached_load(tmp_path, monkeypatch):
    """A SigLIP-kind tokenizer (weights in a folder): the first load records the hash, the
    second uses it; after the weights change (same size, old mtime) the load is refused."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

    from asvr.tokenizer.encoders.base import default_encoder_spec

    monkeypatch.setenv("ASVR_HASH_CACHE", str(tmp_path / "cache"))
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    spec = TokenizerSpec(
        encoder=default_encoder_spec("siglip", str(tmp_path / "siglip")),
        preprocess="square",
        grid=(2, 2),
        dim=32,
        depth=2,
        codebook_size=8,
        shared_codebook=False,
    )
    save_artifact(tmp_path / "tok", spec, torch.randn(2, 8, 32))
    time.sleep(2.1)  # the weights settle (module docstring of weights_hash)
    SemanticTokenizer.load(tmp_path / "tok")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    SemanticTokenizer.load(tmp_path / "tok")
    weights = tmp_path / "siglip" / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(TokenizerError, match="are not the ones this tokenizer was built with"):
        SemanticTokenizer.load(tmp_path / "tok")
