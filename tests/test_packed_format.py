"""Packed shards (core/packed.py) built by train/data/packed_build.py equal the in-memory path's rows."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from asvr.core.packed import PackedError, check_packed_meta, open_packed, write_packed_shard
from asvr.train.data.dataset import Collator, DataConfig, build_training_data
from asvr.train.data.packed_build import (
    PackSettings,
    caption_free_keys,
    pack_unit,
    plan_rows,
    text_tokenizer_hash,
)
from asvr.train.data.packing import PackingConfig
from asvr.train.data.sources import CodeStore, load_conversations
from asvr.train.data.templates import get_template
from asvr.train.model.vision_input import CodesSource
from train_corpus import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


def _in_memory(corpus, tiny_tokenizer, ratio, max_len, template):
    tok = AutoTokenizer.from_pretrained(corpus.llm)
    store = CodeStore.open(corpus.codes, tiny_tokenizer.spec.fingerprint)
    cfg = DataConfig(
        data=[str(corpus.sft)],
        codes=str(corpus.codes),
        caption_free_ratio=ratio,
        seed=3,
        packing=PackingConfig(max_len=max_len),
    )
    data = build_training_data(cfg, get_template(template), tok, store, False)
    return tok, store, data


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_one_unit_equals_the_in_memory_rows(corpus, tiny_tokenizer, tmp_path, ratio):
    tok, store, data = _in_memory(corpus, tiny_tokenizer, ratio, 256, "vicuna_v1")
    settings = PackSettings(template="vicuna_v1", max_len=256, seed=3)
    records = load_conversations([corpus.sft])
    referenced = {r.image for r in records if r.image}
    free = caption_free_keys(store.keys, referenced, ratio, data.n_conversations, 3)
    assert len(free) == data.n_caption_free
    unit = pack_unit(0, records, free, store, tok, settings, text_tokenizer_hash(tok))
    rows = plan_rows(data.lengths, settings, 0)
    assert len(rows) > 1 and any(len(r) > 1 for r in rows)  # really packed
    table = unit.table
    assert table.num_rows == len(rows)
    collate = Collator(
        data,
        CodesSource(store),
        pad_id=tok.pad_token_id or 0,
    )
    for r, row in enumerate(rows):
        b = collate([row])
        got = table.slice(r, 1).to_pylist()[0]
        assert np.array_equal(np.asarray(got["input_ids"]), b.input_ids[0].numpy())
        assert np.array_equal(np.asarray(got["labels"]), b.labels[0].numpy())
        assert got["sample_ids"] == [data.samples[i].sample_id for i in row]
        off = np.asarray(got["sample_offsets"])
        sid = np.repeat(np.arange(1, len(row) + 1), np.diff(off))
        assert np.array_equal(sid, b.sample_ids[0].numpy())
        keys = [data.samples[i].key for i in row if data.samples[i].key is not None]
        assert got["image_keys"] == keys
        codes = np.asarray(got["codes"], np.int64).reshape(len(keys), -1, store.meta.depth)
        if keys:
            assert np.array_equal(codes, b.visual_codes.numpy())
        mask = np.zeros(len(got["input_ids"]), bool)
        for o in got["image_offsets"]:
            mask[o : o + 49] = True
        assert np.array_equal(mask, b.image_mask[0].numpy())
    if ratio:
        assert any(s.startswith("caption-free:") for r in table.column("sample_ids").to_pylist() for s in r)


def test_bad_samples_are_failure_rows_with_the_trainers_reasons(corpus, tiny_tokenizer, tmp_path):
    import json

    bad = json.loads(corpus.sft.read_text()) + [
        {"id": "nokey", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>\nx"}]},
        {
            "id": "notin",
            "image": "missing.jpg",
            "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}],
        },
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    tok = AutoTokenizer.from_pretrained(corpus.llm)
    store = CodeStore.open(corpus.codes, tiny_tokenizer.spec.fingerprint)
    unit = pack_unit(
        0,
        load_conversations([path]),
        [],
        store,
        tok,
        PackSettings(template="vicuna_v1", max_len=256),
        text_tokenizer_hash(tok),
    )
    cfg = DataConfig(
        data=[str(path)], codes=str(corpus.codes), skip_bad_samples=True, packing=PackingConfig(max_len=256)
    )
    data = build_training_data(cfg, get_template("vicuna_v1"), tok, store, False)
    assert [(f["key"], f["stage"], f["error"]) for f in unit.failures] == [
        (b.sample_id, b.kind, b.reason) for b in data.bad
    ]
    assert {f["stage"] for f in unit.failures} == {"malformed", "not in shards"}


def test_meta_refusals_and_corrupt_shard_are_one_line(corpus, tiny_tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(corpus.llm)
    store = CodeStore.open(corpus.codes, tiny_tokenizer.spec.fingerprint)
    unit = pack_unit(
        0,
        load_conversations([corpus.sft]),
        [],
        store,
        tok,
        PackSettings(template="vicuna_v1", max_len=256),
        text_tokenizer_hash(tok),
    )
    path = tmp_path / "packed-00000.parquet"
    write_packed_shard(path, unit.table)
    meta, pf = open_packed(path)
    assert meta.max_len == 256 and meta.template == "vicuna_v1" and meta.image_tokens == 49
    assert pq.read_table(path).equals(unit.table)
    check_packed_meta(str(path), meta, {"max_len": 256, "template": "vicuna_v1"})
    for want, word in (
        ({"max_len": 512}, "max_len"),
        ({"template": "chatml"}, "template"),
        ({"text_tokenizer": "0" * 64}, "text_tokenizer"),
        ({"fingerprint": "f" * 64}, "fingerprint"),
    ):
        with pytest.raises(PackedError) as e:
            check_packed_meta(str(path), meta, want)
        assert str(path) in str(e.value) and word in str(e.value) and "\n" not in str(e.value)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedError) as e:
        open_packed(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
