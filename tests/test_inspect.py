"""Codebook inspection: usage counts, nearest codes, code uses, patch boxes, sheets and the CLI report."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from asvr.core.shards import ShardMeta, load_codes, rows_to_table, write_parquet_shard
from asvr.tokenizer.artifact import load_artifact
from asvr.tokenizer.cli import main
from asvr.tokenizer.codes.inspection import find_code_uses, nearest_codes, patch_box
from asvr.tokenizer.codes.sheets import SheetLayout, Tile, draw_sheet


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer_dir):
    """12 real image files with random (skewed) codes in 3 shards; no encoding needed for usage statistics."""
    root = tmp_path_factory.mktemp("insp")
    keys = write_image_folder(root / "images", 12)
    spec, _ = load_artifact(tiny_tokenizer_dir)
    meta = ShardMeta.from_spec(spec)
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(32, 0.3))  # skewed usage: some codes dead, some dominant
    codes = rng.choice(32, size=(12, 7, 7, 3), p=p)
    out = root / "codes"
    out.mkdir()
    for s in range(3):
        ks = keys[4 * s : 4 * s + 4]
        write_parquet_shard(
            out / f"part-{s:05d}.parquet",
            rows_to_table(
                meta,
                ks,
                codes[4 * s : 4 * s + 4],
                [hashlib.sha256(k.encode()).hexdigest() for k in ks],
                [1] * 4,
                [1] * 4,
                [None] * 4,
            ),
        )
    return {"out": out, "images": root / "images", "tok": tiny_tokenizer_dir, "keys": keys}


def test_report_usage_equals_bincount(shards, tmp_path, capsys):
    rep = tmp_path / "rep"
    _, by_key = load_codes(shards["out"])
    all_codes = np.stack(list(by_key.values())).reshape(-1, 3)
    want = np.stack([np.bincount(all_codes[:, d], minlength=32) for d in range(3)])
    top = int(want[1].argmax())
    rc = main(
        [
            "inspect",
            str(shards["tok"]),
            "--codes",
            str(shards["out"]),
            "--images",
            str(shards["images"]),
            "--report",
            str(rep),
            "--code",
            "1:top",
            "--nearest",
            "0:5",
            "--quiet",
        ]
    )
    assert rc == 0
    report = json.loads((rep / "report.json").read_text())
    assert np.array_equal(np.array(report["usage"]["counts"]), want)
    assert report["usage"]["images"] == 12 and report["usage"]["patches"] == 12 * 49
    for d, s in enumerate(report["usage"]["depths"]):
        assert s["dead_codes"] == np.flatnonzero(want[d] == 0).tolist()
        assert {x["code"] for x in s["dominant"]} == set(np.flatnonzero(want[d] / want[d].sum() > 10 / 32).tolist())
    code = report["codes"][0]
    assert code["patches"] == want[1, top] and code["sheet"] == f"code_1_{top}.png"
    for name in ("usage.png", f"code_1_{top}.png"):
        with Image.open(rep / name) as im:
            im.verify()
    with Image.open(rep / f"code_1_{top}.png") as im:
        assert im.size == SheetLayout().size(min(16, code["images"]))


def test_nearest_codes_equal_bruteforce(tiny_tokenizer_dir):
    _, cb = load_artifact(tiny_tokenizer_dir)
    book = cb[2].numpy().astype(np.float64)
    for k in (0, 7, 31):
        d2 = ((book - book[k]) ** 2).sum(1)
        d2[k] = np.inf
        want = np.argsort(d2, kind="stable")[:6]
        got = nearest_codes(cb[2].numpy(), k, 6)
        assert [c for c, _ in got] == want.tolist()
        np.testing.assert_allclose([x for _, x in got], d2[want], rtol=1e-4)


def test_code_uses_match_numpy(shards):
    spec, _ = load_artifact(shards["tok"])
    _, by_key = load_codes(shards["out"])
    d, k = 0, 3
    per = {key: c[..., d] == k for key, c in by_key.items()}
    counts = {key: int(m.sum()) for key, m in per.items() if m.any()}
    uses = find_code_uses(shards["out"], spec.fingerprint, d, k, max_images=4)
    assert uses.images == len(counts) and uses.patches == sum(counts.values())
    want = sorted(counts, key=lambda key: (-counts[key], key))[:4]
    assert [u.key for u in uses.top] == want
    for u in uses.top:
        assert sorted(u.positions) == [tuple(p) for p in np.argwhere(per[u.key]).tolist()]


def test_patch_boxes_tile_the_image():
    grid = (7, 7)
    for size in ((96, 72), (50, 120), (64, 64)):
        for mode in ("square", "pad"):
            boxes = [patch_box(h, w, grid, size, mode) for h in range(7) for w in range(7)]
            area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes if b is not None)
            assert area == pytest.approx(size[0] * size[1]), (size, mode)
    # pad, wide image 96x72: canvas 96, image pasted at y = 12; cell rows of 96/7 px; row 0 spans y 0..13.7 -> 0..1.7
    assert patch_box(0, 0, grid, (96, 72), "pad") == pytest.approx((0, 0, 96 / 7, 96 / 7 - 12))
    assert patch_box(3, 0, grid, (96, 72), "square") == pytest.approx((0, 3 * 72 / 7, 96 / 7, 4 * 72 / 7))
    # a tall 20x120 image in pad mode: the leftmost and rightmost columns are pure padding
    assert patch_box(0, 0, grid, (20, 120), "pad") is None and patch_box(0, 3, grid, (20, 120), "pad") is not None


def test_sheet_size_and_missing_tiles(tmp_path):
    tiles = [Tile(Image.new("RGB", (50, 30), "red"), "a\nb", [(0, 0, 10, 10)]), Tile(None, "missing")] * 4
    layout = SheetLayout(tile=64, cols=3)
    img = draw_sheet(tiles, layout, title="t")
    assert img.size == layout.size(8) == (3 * 70 + 6, 20 + 3 * (64 + 24 + 6) + 6)


def test_bad_inspect_arguments(shards, capsys):
    assert main(["inspect", str(shards["tok"]), "--code", "0:1"]) == 2
    assert main(["inspect", str(shards["tok"]), "--nearest", "3:0"]) == 2
    assert main(["inspect", str(shards["tok"]), "--nearest", "zero"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("asvr-tokenizer inspect: error:") for line in err)


def test_inspect_without_options_prints_the_summary(shards, capsys):
    from asvr.tokenizer.artifact import load_artifact

    spec, cb = load_artifact(shards["tok"])
    assert main(["inspect", str(shards["tok"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{shards['tok']}: efficientnet_lite0") and "3 depths x 32 codes" in out[0]
    assert out[1] == f"fingerprint {spec.fingerprint}"
    norms = [float(line.split()[-1]) for line in out[2:5]]
    assert [line.split(":")[0] for line in out[2:5]] == ["depth 0", "depth 1", "depth 2"]  # numbered from 0
    np.testing.assert_allclose(norms, np.linalg.norm(cb.numpy(), axis=-1).mean(-1), rtol=1e-3)
    assert out[5].startswith("more: --codes CODES")
