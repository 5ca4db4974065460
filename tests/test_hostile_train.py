"""Hostile inputs on the training side (issue 9): a planted pickle in a run folder,
shard keys escaping ``--images``, corrupt shards.  Each failed before the fix."""

from __future__ import annotations

import random
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from asvr.core.shards import ShardMeta, rows_to_table, write_parquet_shard
from asvr.train.loop import checkpoint
from asvr.train.cli import main
from asvr.train.data.dataset import DataConfig, build_training_data
from asvr.train.data.packing import PackingConfig
from asvr.train.data.sources import CodeStore, DataError
from asvr.train.data.templates import plain
from conftest import image_bytes
from train_corpus import make_corpus, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


class _Plant:
    """Unpickling this creates a file: proof that the pickle ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_rng_state_round_trips_without_pickles(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # numpy's cached gaussian is part of the state
    path = tmp_path / "rng-rank0.pt"
    torch.save(checkpoint.rng_state(), path)
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    checkpoint.set_rng_state(checkpoint.load_rng_state(path))  # weights_only=True inside
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want
    torch.load(path, weights_only=True)  # nothing but tensors, numbers and strings


def test_resume_refuses_a_planted_pickle_without_running_it(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "2", "--save-every", "1", "--no-export"]
    assert main(train_args(corpus, tiny_tokenizer_dir, out, *common, "--stop-after", "1")) == 0
    rng = out / "checkpoints" / "step00000001" / "rng-rank0.pt"
    assert rng.exists()
    marker = tmp_path / "pwned"
    torch.save(_Plant(marker), rng)  # a real torch file whose unpickling calls open(marker, "w")
    capsys.readouterr()
    rc = main(train_args(corpus, tiny_tokenizer_dir, out, *common, "--resume", "auto"))
    assert not marker.exists(), "the planted pickle ran"  # before: torch.load(weights_only=False) ran it
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it: transformers' weight-loading bar)
    assert rc == 2 and "Traceback" not in err and last.startswith("asvr-train: error:")
    assert "rng-rank0.pt" in last and "refused" in last


def _escaping_codes(corpus, tiny_tokenizer, tmp_path):
    """The corpus shards plus one row keyed ``../secret.jpg``, a file just outside --images."""
    (corpus.images.parent / "secret.jpg").write_bytes(image_bytes(99))
    codes = tmp_path / "codes"
    shutil.copytree(corpus.codes, codes)
    meta = ShardMeta.from_spec(tiny_tokenizer.spec)
    c = next(iter(corpus.codes_by_key.values()))[None]
    write_parquet_shard(
        codes / "part-00009.parquet", rows_to_table(meta, ["../secret.jpg"], c, ["0" * 64], [1], [1], [None])
    )
    return codes


@pytest.mark.parametrize("vision_input", ["online", "features"])
def test_shard_keys_escaping_images_are_refused(corpus, tiny_tokenizer, tmp_path, vision_input):
    codes = _escaping_codes(corpus, tiny_tokenizer, tmp_path)
    store = CodeStore.open(codes, tiny_tokenizer.spec.fingerprint)
    cfg = DataConfig(
        data=[str(corpus.pretrain)],
        codes=str(codes),
        images=str(corpus.images),
        vision_input=vision_input,
        caption_free_ratio=1.0,
        packing=PackingConfig(max_len=256),
    )
    llm_tok = AutoTokenizer.from_pretrained(corpus.llm)
    with pytest.raises(DataError, match=r"unsafe image path.*'\.\./secret\.jpg': image path escapes --images"):
        build_training_data(cfg, plain(), llm_tok, store, check_images=True)  # before: secret.jpg was read
    skipped = build_training_data(
        DataConfig(**{**cfg.__dict__, "skip_bad_samples": True}), plain(), llm_tok, store, check_images=True
    )
    assert "../secret.jpg" not in {s.key for s in skipped.samples} and skipped.samples


def test_corrupt_shard_is_a_one_line_error_naming_it(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    codes = tmp_path / "codes"
    shutil.copytree(corpus.codes, codes)
    bad = sorted(codes.glob("part-*.parquet"))[1]
    bad.write_bytes(bad.read_bytes()[: pq.read_metadata(bad).serialized_size])  # cut in the middle
    rc = main(train_args(corpus, tiny_tokenizer_dir, tmp_path / "run", "--max-steps", "1", codes=codes))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0], err  # before: pyarrow traceback
    assert re.search(r"unreadable code shard", err[0])
