"""Stages alone (no Ray): uint8 decode + in-actor normalisation == the tokenizer's preprocess, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import image_bytes

from asvr.pipeline.job.stages import Encoder, ReadDecode, TokenizerBuilder


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer_dir):
    return Encoder(TokenizerBuilder(str(tiny_tokenizer_dir)))


@pytest.mark.parametrize("mode", ["square", "pad"])
def test_decode_then_normalise_equals_preprocess(tmp_path, tiny_tokenizer, encoder, mode):
    datas = [image_bytes(i, size=(90 + 13 * i, 60 + 5 * i)) for i in range(3)]
    for i, d in enumerate(datas):
        (tmp_path / f"{i}.jpg").write_bytes(d)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    names = ["0.jpg", "bad.jpg", "1.jpg", "2.jpg"]
    n = len(names)
    block = {
        "idx": np.arange(n),
        "key": np.array(names, object),
        "source": np.array(names, object),
        "kind": np.array(["file"] * n, object),
        "path": np.array([str(tmp_path / x) for x in names], object),
        "offset": np.full(n, -1),
        "size": np.full(n, -1),
        "cap_offset": np.full(n, -1),
        "cap_size": np.full(n, -1),
        "cap_kind": np.array([""] * n, object),
        "caption": np.array([None] * n, object),
        "image_column": np.array([None] * n, object),
        "error": np.array([None] * n, object),
    }
    cfg = tiny_tokenizer.preprocess_config(mode)
    out = ReadDecode(cfg)(block)
    assert out["ok"].tolist() == [True, False, True, True]
    assert out["stage"][1] == "decode" and "not an image" in out["error"][1]
    enc = encoder
    got = enc.normalise(out["pixels"][out["ok"]]).numpy()
    want = tiny_tokenizer.preprocess_images(datas, mode)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    res = enc(out)
    assert res["codes"].dtype == np.uint16 and not res["codes"][1].any()
    ref = tiny_tokenizer.encode_images(datas, mode).numpy().reshape(3, -1)
    np.testing.assert_array_equal(res["codes"][out["ok"]].astype(np.int64), ref)
