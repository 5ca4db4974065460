"""The tokenizer artifact on disk (``save_artifact`` / ``load_artifact``): the
files' exact contents against an independent reading (json, safetensors), and
every refusal's whole message.  Tiny codebooks and the packaged encoder: no
model is built, so the file runs in about a second."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asvr.tokenizer.encoders.base import default_encoder_spec
from asvr.tokenizer.artifact import (
    TokenizerError,
    TokenizerSpec,
    compute_fingerprint,
    load_artifact,
    save_artifact,
)
from asvr.tokenizer.encoders.base import hash_encoder_weights


def _spec(shared=False, **kw) -> TokenizerSpec:
    return TokenizerSpec(
        encoder=default_encoder_spec(),
        preprocess="pad",
        grid=(3, 5),
        dim=3,
        depth=2,
        codebook_size=4,
        shared_codebook=shared,
        **kw,
    )


def _books(shared=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1 if shared else 2, 4, 3, generator=g, dtype=torch.float64).to(dtype)


def test_an_unsaved_spec_and_its_dict():
    spec = _spec()
    assert spec.tokens_per_image == 15 and spec.codes_per_image == 30
    assert spec.fingerprint == "" and spec.format_version == 1  # save_artifact fills the fingerprint
    d = spec.to_dict()
    assert d["grid"] == [3, 5] and d["encoder"] == asdict(spec.encoder)
    again = TokenizerSpec.from_dict(d)
    assert again == spec and again.grid == (3, 5) and d == spec.to_dict()  # the caller's dict is left alone


@pytest.mark.parametrize("shared", [False, True])
def test_saved_files_hold_exactly_the_spec_and_the_codebooks(tmp_path, shared):
    out = tmp_path / "a" / "tok"  # parents created
    cb = _books(shared, torch.float64)  # stored as float32
    saved = save_artifact(out, _spec(shared), cb)
    enc = default_encoder_spec()
    assert saved.encoder.weights_sha256 == hash_encoder_weights(enc) != ""
    assert saved.fingerprint == compute_fingerprint(saved, cb.float())
    want = {
        "encoder": asdict(replace(enc, weights_sha256=saved.encoder.weights_sha256)),
        "preprocess": "pad",
        "grid": [3, 5],
        "dim": 3,
        "depth": 2,
        "codebook_size": 4,
        "shared_codebook": shared,
        "fingerprint": saved.fingerprint,
        "format_version": 1,
    }
    assert (out / "tokenizer.json").read_text() == json.dumps(want, indent=2) + "\n"
    stored = load_file(str(out / "codebooks.safetensors"))
    assert list(stored) == ["codebooks"] and stored["codebooks"].dtype == torch.float32
    assert torch.equal(stored["codebooks"], cb.float())
    with safe_open(str(out / "codebooks.safetensors"), "pt") as f:
        assert f.metadata() == {"fingerprint": saved.fingerprint}
    assert sorted(p.name for p in out.iterdir()) == ["codebooks.safetensors", "tokenizer.json"]  # no temp files

    spec, books = load_artifact(out)
    assert spec == saved and spec.grid == (3, 5) and spec.encoder == saved.encoder
    assert torch.equal(books, cb.float())


def test_save_keeps_a_recorded_weights_hash_and_takes_any_layout(tmp_path):
    spec = _spec()
    spec.encoder.weights_sha256 = "a" * 64
    cb = _books().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # not contiguous, with grad
    saved = save_artifact(tmp_path, spec, cb)
    assert saved.encoder.weights_sha256 == "a" * 64
    assert saved.fingerprint == compute_fingerprint(saved, _books())
    assert torch.equal(load_artifact(tmp_path)[1], _books())


def test_encoder_weights_are_found_next_to_the_tokenizer(tmp_path, monkeypatch):
    """A relative ``weights`` path is relative to the tokenizer folder, not the working directory."""
    out = tmp_path / "tok"
    (out / "enc").mkdir(parents=True)
    (out / "enc" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    spec = replace(_spec(), encoder=replace(default_encoder_spec(), weights="enc/model.safetensors"))
    saved = save_artifact(out, spec, _books())
    assert saved.encoder.weights_sha256 == hashlib.sha256(b"model.safetensors" + b"weights").hexdigest()


def test_fingerprint_is_of_the_float32_values():
    spec = replace(_spec(), encoder=replace(default_encoder_spec(), weights_sha256="b" * 64))
    want = compute_fingerprint(spec, _books())
    assert compute_fingerprint(spec, _books(dtype=torch.float64)) == want
    assert compute_fingerprint(spec, _books().requires_grad_()) == want


def test_save_refuses_codebooks_of_another_shape(tmp_path):
    with pytest.raises(TokenizerError) as e:
        save_artifact(tmp_path / "tok", _spec(shared=True), _books())
    assert str(e.value) == "codebooks have shape (2, 4, 3), spec wants (1, 4, 3)"
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
    assert not (tmp_path / "tok" / "codebooks.safetensors").exists()


@pytest.fixture
def tok(tmp_path):
    save_artifact(tmp_path / "tok", _spec(), _books())
    return tmp_path / "tok"


def _edit_json(tok, **changes):
    js = json.loads((tok / "tokenizer.json").read_text())
    js.update(changes)
    (tok / "tokenizer.json").write_text(json.dumps(js))


def test_load_refuses_a_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_artifact(tmp_path)
    assert str(e.value) == f"{tmp_path} is not a tokenizer directory (no tokenizer.json)"


@pytest.mark.parametrize(
    "text,why",
    [
        ("{", "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ('{"format_version": 1}', "('encoder')"),
        (None, "(TokenizerSpec.__init__() got an unexpected keyword argument 'extra')"),
    ],
)
def test_load_refuses_a_malformed_tokenizer_json(tok, text, why):
    if text is None:
        _edit_json(tok, extra=1)
    else:
        (tok / "tokenizer.json").write_text(text)
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == f"{tok / 'tokenizer.json'}: malformed {why}"


@pytest.mark.parametrize("version", [2, None, "absent"])
def test_load_refuses_another_format_version(tok, version):
    _edit_json(tok, format_version=version)
    if version == "absent":
        js = json.loads((tok / "tokenizer.json").read_text())
        del js["format_version"]
        (tok / "tokenizer.json").write_text(json.dumps(js))
        version = None
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == f"tokenizer format_version {version} is not 1"


def test_load_refuses_missing_or_foreign_codebooks(tok):
    cbf = tok / "codebooks.safetensors"
    save_file({"codebooks": _books(), "x": torch.zeros(1)}, str(cbf))
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == f"{cbf}: expected one tensor 'codebooks', found ['codebooks', 'x']"
    save_file({"codebooks": _books()[:1]}, str(cbf))
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == f"{cbf}: codebooks have shape (1, 4, 3), tokenizer.json says (2, 4, 3)"
    cbf.unlink()
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == f"{tok}: missing codebooks.safetensors"


def test_load_refuses_edited_codebooks_unless_told_not_to_verify(tok):
    spec, cb = load_artifact(tok)
    edited = cb.clone()
    edited[1, 2, 0] += 0.5
    save_file({"codebooks": edited}, str(tok / "codebooks.safetensors"))
    got = compute_fingerprint(spec, edited)
    with pytest.raises(TokenizerError) as e:
        load_artifact(tok)
    assert str(e.value) == (
        f"fingerprint mismatch: {tok}'s codebooks and encoder has {got[:12]}, its tokenizer.json has "
        f"{spec.fingerprint[:12]}; the codebooks or tokenizer.json were changed"
    )
    spec2, cb2 = load_artifact(tok, verify=False)
    assert spec2 == spec and torch.equal(cb2, edited)
