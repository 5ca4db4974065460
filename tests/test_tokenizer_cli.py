"""train / validate / encode end to end on generated images (real EfficientNet-Lite0, real faiss)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.rvq.quantizer import rvq_encode_reference
from asvr.tokenizer.cli import main
from conftest import write_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_image_folder(root / "train", 24)
    write_image_folder(root / "held", 8, start=100)
    (root / "train" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    tok = root / "tok"
    rc = main(
        [
            "train",
            "--images",
            str(root / "train"),
            "--depth",
            "3",
            "--codebook-size",
            "16",
            "--method",
            "kmeans",
            "--refine-rounds",
            "2",
            "--seed",
            "0",
            "--out",
            str(tok),
        ]
    )
    assert rc == 0
    return root, tok, SemanticTokenizer.load(tok)


def test_train_writes_a_loadable_tokenizer(trained):
    root, tok, t = trained
    assert (t.spec.depth, t.spec.codebook_size, t.spec.dim, t.spec.grid) == (3, 16, 320, (7, 7))
    # codes of a training image are the exact greedy RVQ of its features
    img = sorted((root / "train").rglob("*.jpg"))[1]
    feats = t.features(t.preprocess_images([img])).reshape(-1, 320).numpy()
    codes = t.encode_images([img]).reshape(-1, 3).numpy()
    np.testing.assert_array_equal(codes, rvq_encode_reference(feats, t.quantizer.codebooks.numpy()))


def test_validate_report_error_falls_with_depth(trained, capsys):
    root, tok, _ = trained
    rep = root / "report"
    assert main(["validate", str(tok), "--images", str(root / "held"), "--report", str(rep)]) == 0
    r = json.loads((rep / "report.json").read_text())
    errs = [d["rel_error"] for d in r["per_depth"]]
    assert r["n_images"] == 8 and r["n_vectors"] == 8 * 49
    assert errs[0] < 1 and all(b < a for a, b in zip(errs, errs[1:]))
    cos = [d["cosine"] for d in r["per_depth"]]
    assert all(b > a for a, b in zip(cos, cos[1:]))
    for d in r["per_depth"]:
        assert 0 < d["utilisation"] <= 1 and d["dead_codes"] == 16 - round(16 * d["utilisation"])
        assert 1 <= d["perplexity"] <= 16
    assert sum(r["usage"][0]) == 8 * 49
    assert [d["depth"] for d in r["per_depth"]] == [0, 1, 2]  # numbered from 0, as --code D:K and asvr-eval
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "0"
    from PIL import Image

    with Image.open(rep / "usage.png") as im:  # the inspect usage plot: one readable panel per depth
        assert im.text["Title"] == "tok: code usage over 8 images (392 patches)"
        assert im.size[1] > 3 * 150
    with Image.open(rep / "error_cosine.png") as im:
        assert im.text["Title"].startswith("tok: 8 images")


def test_encode_prints_codes_and_bad_image_is_one_line(trained, capsys, tmp_path):
    root, tok, t = trained
    img = sorted((root / "held").rglob("*.jpg"))[0]
    assert main(["encode", str(tok), str(img), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    codes = np.asarray(out["codes"])
    assert codes.shape == (7, 7, 3)
    feats = t.features(t.preprocess_images([img])).reshape(-1, 320).numpy()
    np.testing.assert_array_equal(codes.reshape(-1, 3), rvq_encode_reference(feats, t.quantizer.codebooks.numpy()))
    assert main(["encode", str(tok), str(img)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and len(lines[1].split()) == 7
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["encode", str(tok), str(img), str(bad)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "not an image" in err[0] and cap.out == ""


def test_train_errors_are_one_line(tmp_path, capsys):
    write_image_folder(tmp_path / "few", 2)
    assert (
        main(
            [
                "train",
                "--images",
                str(tmp_path / "few"),
                "--depth",
                "2",
                "--codebook-size",
                "128",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "codebook size 128 > 98 training vectors" in err[0]  # before any encoding
    assert (
        main(
            [
                "train",
                "--images",
                str(tmp_path / "few"),
                "--depth",
                "2",
                "--codebook-size",
                "12",
                "--method",
                "rq",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 2
    )
    assert "power-of-two" in capsys.readouterr().err
