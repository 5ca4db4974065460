"""The ``hf-datasets`` input format (a plug-in module): a ``Dataset.save_to_disk`` folder
tokenized by the real Ray job gives the codes of the in-process tokenizer on the same bytes."""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes

from asvr.pipeline.cli import main
from asvr.pipeline.inputs.sources import SourceError, SourceOptions, detect_format, discover, input_formats
from asvr.core.shards import FAILURES, load_codes, read_shard

datasets = pytest.importorskip("datasets")
ray = pytest.importorskip("ray")


def save_dataset(folder, datas, keys, captions, paths=None, cwd=None):
    """``paths``: row -> a file name given instead of bytes (save_to_disk reads it, relative to ``cwd``)."""
    rows = [{"bytes": d, "path": None} for d in datas]
    for i, p in (paths or {}).items():
        rows[i] = {"bytes": None, "path": p}
    feats = datasets.Features(
        {"id": datasets.Value("string"), "picture": datasets.Image(), "text": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict({"id": keys, "picture": rows, "text": captions}, features=feats)
    with contextlib.chdir(cwd or folder.parent):
        ds.save_to_disk(str(folder))


def test_registered_detected_and_planned(tmp_path):
    assert "hf-datasets" in input_formats()
    save_dataset(tmp_path / "ds", [image_bytes(1), image_bytes(2)], ["a", "b"], ["cap a", None])
    assert detect_format(tmp_path / "ds") == "hf-datasets"
    (tmp_path / "plain").mkdir()
    assert detect_format(tmp_path / "plain") == "folder"  # a plain folder is still a folder
    plan, described = discover([str(tmp_path / "ds")], SourceOptions())
    assert plan.column("key").to_pylist() == ["a", "b"] and described[0]["format"] == "hf-datasets"
    assert plan.column("image_column").to_pylist() == ["picture", "picture"]  # found by its Image feature
    assert plan.column("caption").to_pylist() == ["cap a", None]


def test_datasets_folder_tokenizes_like_in_process_encode(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    datas = [image_bytes(400 + i, size=(40 + 9 * i, 36)) for i in range(4)]
    root = tmp_path / "root"
    root.mkdir()
    (root / "by_ref.jpg").write_bytes(datas[3])
    save_dataset(
        tmp_path / "ds",
        datas[:3] + [b""],
        ["k0", "k1", "k2", "k3"],
        ["c0", None, "c2", "c3"],
        paths={3: "by_ref.jpg"},
        cwd=root,
    )
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        rc = main(
            [
                "tokenize",
                str(tmp_path / "ds"),
                "--tokenizer",
                str(tiny_tokenizer_dir),
                "--out",
                str(out),
                "--shard-size",
                "3",
                "--no-progress",
                "--batch-size",
                "2",
            ]
        )
    finally:
        ray.shutdown()
    assert rc == 0
    _, codes = load_codes(out, tiny_tokenizer.spec.fingerprint)
    keys = ["k0", "k1", "k2", "k3"]
    assert sorted(codes) == keys
    ref = tiny_tokenizer.encode_images(datas).numpy()
    np.testing.assert_array_equal(np.stack([codes[k] for k in keys]).astype(np.int64), ref)
    caps = {r["key"]: r["caption"] for p in sorted(out.glob("part-*.parquet")) for r in read_shard(p)[1].to_pylist()}
    assert caps == {"k0": "c0", "k1": None, "k2": "c2", "k3": "c3"}
    assert pq.read_table(out / FAILURES).num_rows == 0


def test_dataset_dict_is_refused_naming_its_splits(tmp_path):
    save_dataset(tmp_path / "ds", [image_bytes(1)], ["a"], [None])
    dd = datasets.DatasetDict({"train": datasets.load_from_disk(str(tmp_path / "ds"))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert detect_format(tmp_path / "dd") == "hf-datasets"
    with pytest.raises(SourceError, match="several splits") as e:
        discover([str(tmp_path / "dd")], SourceOptions())
    assert str(tmp_path / "dd" / "train") in str(e.value) and "\n" not in str(e.value)
