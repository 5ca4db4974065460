"""``asvr-pipeline pack`` (exactly once, resume, failures) and the per-rank packed stream
(exactly once per epoch, elastic resume over a changed world size)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from asvr.core.packed import PackedError
from asvr.pipeline.cli import main as pipeline_main
from asvr.train.data.packed_stream import PackedCollator, PackedCorpus, PackedStreamLoader
from train_corpus import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer, n_images=24, n_captioned=20)


def pack_args(corpus, out, *extra):
    return [
        "pack", "--codes", str(corpus.codes), "--data", str(corpus.sft), "--model", str(corpus.llm),
        "--out", str(out), "--max-len", "256", "--template", "vicuna_v1", "--caption-free-ratio", "0.1",
        "--unit-size", "6", "--num-cpus", "2", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "p"
    assert pipeline_main(pack_args(corpus, out)) == 0
    return out


def _loader(packed, rank=0, world=1, rows=1, seed=5, **kw):
    corpus = PackedCorpus.open(packed, {"max_len": 256, "template": "vicuna_v1"})
    return PackedStreamLoader(
        corpus, PackedCollator(corpus.meta, pad_id=0), rows=rows, seed=seed, rank=rank, world=world, **kw
    )


def _all_samples(packed) -> Counter:
    return Counter(
        s
        for f in sorted(packed.glob("packed-*.parquet"))
        for r in pq.read_table(f).column("sample_ids").to_pylist()
        for s in r
    )


def test_pack_writes_manifest_failures_and_every_sample_once(packed, capsys):
    m = json.loads((packed / "manifest.json").read_text())
    assert m["complete"] and m["units"] == 4 and m["run"]["max_len"] == 256
    assert m["meta"]["template"] == "vicuna_v1" and len(m["meta"]["text_tokenizer"]) == 64
    samples = _all_samples(packed)
    assert set(samples.values()) == {1}  # every sample in exactly one packed row
    assert len(samples) == m["counts"]["samples"] == 21 + m["counts"]["caption_free"]
    assert m["counts"]["caption_free"] == 2  # round(0.1/0.9 * 21) of the 4 free images
    assert pq.read_table(packed / "failures.parquet").num_rows == 0


def test_pack_rerun_is_a_no_op_and_other_settings_are_refused(corpus, packed, capsys):
    before = {p.name: p.read_bytes() for p in packed.glob("packed-*.parquet")}
    assert pipeline_main(pack_args(corpus, packed)) == 0
    assert "4 units (4 already done)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in packed.glob("packed-*.parquet")} == before
    assert pipeline_main(pack_args(corpus, packed, "--max-len", "300")) == 2
    err = capsys.readouterr().err.strip()
    assert "max_len 256 -> 300" in err and "--overwrite" in err and "\n" not in err


def test_pack_resumes_after_a_lost_unit_with_the_same_bytes(corpus, packed, tmp_path, capsys):
    import shutil

    out = tmp_path / "p"
    shutil.copytree(packed, out)
    (out / ".units" / "unit-00002.json").unlink()  # as if killed between the shard and the marker
    (out / "packed-00001.parquet").unlink()  # and before unit 1's shard
    (out / "manifest.json").write_text(
        json.dumps({**json.loads((packed / "manifest.json").read_text()), "complete": False})
    )
    assert pipeline_main(pack_args(corpus, out)) == 0
    assert "4 units (2 already done)" in capsys.readouterr().out
    for p in packed.glob("packed-*.parquet"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert (out / "manifest.json").read_text() == (packed / "manifest.json").read_text()


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _trained(loaders_steps):
    """Sample ids of micro-batches: run each (loader, steps) and read what each row held."""
    ids: list[str] = []
    for loader, steps in loaders_steps:
        for _ in range(steps):
            where = loader.rank_rows(loader.consumed)
            for _, g, r in where:
                ids.extend(loader.reader.row(g, r)["sample_ids"])
            loader.consumed += loader.world * loader.rows
    return ids


def test_one_epoch_on_two_ranks_is_every_sample_once(packed):
    ranks = [_loader(packed, rank=r, world=2) for r in range(2)]
    n = ranks[0].corpus.n_rows
    steps = n // 2
    ids = _trained([(ranks[0], steps)]) + _trained([(ranks[1], steps)])
    every = _all_samples(packed)
    if n % 2 == 0:
        assert Counter(ids) == every
    assert max(Counter(ids).values()) == 1


@pytest.mark.parametrize("w_from,w_to", [(2, 1), (1, 2), (2, 3)])
def test_elastic_resume_trains_the_rest_of_the_epoch_once(packed, w_from, w_to):
    first = [_loader(packed, rank=r, world=w_from) for r in range(w_from)]
    n = first[0].corpus.n_rows
    k = 3
    ids = [s for ld in first for s in _trained([(ld, k)])]
    state = first[0].state_dict()
    assert all(ld.state_dict() == state for ld in first)
    second = [_loader(packed, rank=r, world=w_to) for r in range(w_to)]
    for ld in second:
        ld.load_state_dict(state)
    left = (n - state["consumed"]) // w_to
    ids += [s for ld in second for s in _trained([(ld, left)])]
    tail = (n - state["consumed"]) % w_to  # rows of epoch 0 that go to the next step (straddling)
    c = Counter(ids)
    assert max(c.values()) == 1
    assert len(set(_all_samples(packed)) - set(c)) <= tail * 4  # at most the tail rows' samples


def test_order_is_seeded_and_shuffled(packed):
    a = [tuple(b.input_ids[0].tolist()) for b in _take(_loader(packed, seed=1), 6)]
    assert a == [tuple(b.input_ids[0].tolist()) for b in _take(_loader(packed, seed=1), 6)]
    assert a != [tuple(b.input_ids[0].tolist()) for b in _take(_loader(packed, seed=2), 6)]


def test_refusals_are_one_line_naming_the_file(packed, tmp_path):
    with pytest.raises(PackedError) as e:
        PackedCorpus.open(packed, {"max_len": 512, "template": "vicuna_v1"})
    assert "packed-00000.parquet" in str(e.value) and "max_len" in str(e.value) and "\n" not in str(e.value)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    f = bad / "packed-00001.parquet"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(PackedError) as e:
        PackedCorpus.open(bad, {})
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    loader = _loader(packed, rows=1)
    with pytest.raises(PackedError):
        loader.load_state_dict({"epoch": 0, "position": 3, "seed": 5, "world": 1})


def test_caption_free_count_is_over_the_conversations_that_became_samples(corpus, tiny_tokenizer, tmp_path, capsys):
    """One conversation bad only once tokenized (no gpt turn) and one whose image is in no shard:
    pack draws as many caption-free images as the in-memory path (whose count is over the good
    conversations: 21 -> round(0.116 * 21) = 2; over the 23 records it would be 3), the same
    ones, and the same samples."""
    from transformers import AutoTokenizer

    from asvr.train.data.dataset import DataConfig, build_training_data
    from asvr.train.data.packing import PackingConfig
    from asvr.train.data.sources import CodeStore
    from asvr.train.data.templates import get_template

    bad = json.loads(corpus.sft.read_text()) + [
        {"id": "noanswer", "image": corpus.keys[0], "conversations": [{"from": "human", "value": "<image>\nx"}]},
        {"id": "notin", "image": "missing.jpg",
         "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
    ]  # fmt: skip
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(bad))
    out = tmp_path / "p"
    args = pack_args(corpus, out, "--caption-free-ratio", "0.104")
    args[args.index("--data") + 1] = str(data)
    assert pipeline_main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    cfg = DataConfig(data=[str(data)], codes=str(corpus.codes), caption_free_ratio=0.104, skip_bad_samples=True,
                     seed=0, packing=PackingConfig(max_len=256))  # fmt: skip
    store = CodeStore.open(corpus.codes, tiny_tokenizer.spec.fingerprint)
    mem = build_training_data(cfg, get_template("vicuna_v1"), AutoTokenizer.from_pretrained(corpus.llm), store, False)
    assert mem.n_conversations == 21 and mem.n_caption_free == 2
    assert m["counts"]["caption_free"] == mem.n_caption_free and m["counts"]["conversations"] == 21
    assert _all_samples(out) == Counter(s.sample_id for s in mem.samples)
    assert pq.read_table(out / "failures.parquet").column("key").to_pylist() == ["noanswer", "notin"]
    assert "4 units (0 already done)" in capsys.readouterr().out
    assert pipeline_main(args) == 0  # a rerun: the counts from the markers, one pass, nothing redone
    assert "4 units (4 already done)" in capsys.readouterr().out
