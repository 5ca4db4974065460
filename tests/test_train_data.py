"""Data side of asvr-train: templates, shards + conversations join, bad samples,
packing, collation into Batch, resumable loader.  No DeepSpeed here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from asvr.train.data.dataset import Collator, DataConfig, PackedLoader, build_training_data
from asvr.train.model.vision_input import CodesSource, SourceContext, get_vision_input
from asvr.train.model.vision_tower import VisionTower
from asvr.train.data.packing import PackingConfig, best_fit_rows, padding_waste, plan_epoch, shard_for_rank
from asvr.core.errors import FingerprintError
from asvr.train.data.sources import CodeStore, DataError
from asvr.train.data.templates import (
    IGNORE_INDEX,
    ConversationError,
    chatml,
    encode_conversation,
    plain,
    vicuna_v1,
    validate_turns,
)
from train_corpus import caption, make_corpus

HW = 49  # the tiny tokenizer's 7x7 grid


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer)


@pytest.fixture(scope="module")
def llm_tok(corpus):
    return AutoTokenizer.from_pretrained(corpus.llm)


def _store(corpus, tiny_tokenizer, codes=None):
    return CodeStore.open(codes or corpus.codes, tiny_tokenizer.spec.fingerprint)


# ---------------------------------------------------------------- templates
TURNS = [
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "a red square"},
    {"from": "human", "value": "Colour?"},
    {"from": "gpt", "value": "red"},
]


def _text(tok, enc, mask):
    return tok.decode(enc.input_ids[mask].tolist())


def test_vicuna_labels_only_on_answers_and_layout_matches_llava(llm_tok):
    enc = encode_conversation(vicuna_v1(), validate_turns(TURNS, True), llm_tok, HW)
    t = vicuna_v1()
    # independent rendering, as LLaVA's conv_vicuna_v1 (sep " ", sep2 "</s>")
    want = f"<s>{t.system} USER: \nWhat is it? ASSISTANT: a red square</s>USER: Colour? ASSISTANT: red</s>"
    assert _text(llm_tok, enc, ~enc.image_mask) == want
    assert _text(llm_tok, enc, enc.trained) == " a red square</s> red</s>"  # LLaVA trains the answer's space
    assert enc.image_mask.sum() == HW
    first = int(np.argmax(enc.image_mask))
    assert enc.image_mask[first : first + HW].all()  # one contiguous block
    assert (enc.labels[enc.image_mask] == IGNORE_INDEX).all()


def test_chatml_and_plain(llm_tok):
    enc = encode_conversation(chatml(), validate_turns(TURNS, True), llm_tok, HW)
    assert _text(llm_tok, enc, enc.trained) == "a red square<|im_end|>red<|im_end|>"
    assert _text(llm_tok, enc, ~enc.image_mask).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nWhat is it?<|im_end|>\n"
    )
    pre = validate_turns(TURNS[:2], True)
    enc = encode_conversation(plain(), pre, llm_tok, HW)
    assert enc.input_ids[0] == llm_tok.bos_token_id and enc.image_mask[1 : 1 + HW].all()
    assert _text(llm_tok, enc, ~enc.image_mask) == "<s>a red square\n"  # the question text is dropped
    assert _text(llm_tok, enc, enc.trained) == "a red square\n"


@pytest.mark.parametrize(
    "turns,has_image,msg",
    [
        ([], True, "non-empty"),
        ([{"from": "gpt", "value": "x"}], False, "alternation"),
        ([{"from": "human", "value": "x"}], False, "last turn"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}], False, "from, value"),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "y"}], True, "placeholders"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}], False, "no image"),
        ([{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}], False, "not human/gpt"),
    ],
)
def test_malformed_conversations(turns, has_image, msg):
    with pytest.raises(ConversationError, match=msg):
        validate_turns(turns, has_image)


def test_image_placeholder_moved_first_never_added():
    turns = validate_turns([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], True)
    assert turns[0][1] == "hi"  # as LLaVA: no placeholder, no image in the stream
    turns = validate_turns([{"from": "human", "value": " hi <image> "}, {"from": "gpt", "value": "yo"}], True)
    assert turns[0][1] == "<image>\nhi"


# ---------------------------------------------------------------- shards
def test_code_store_parquet_and_webdataset_agree(corpus, tiny_tokenizer, tmp_path):
    wds = make_corpus(tmp_path / "w", tiny_tokenizer, fmt="webdataset", llm=corpus.llm)
    for store in (_store(corpus, tiny_tokenizer), _store(wds, tiny_tokenizer)):
        assert sorted(store.keys) == sorted(corpus.keys)
        for k in corpus.keys:
            np.testing.assert_array_equal(store.get(k), corpus.codes_by_key[k].reshape(HW, -1))
    cached = CodeStore.open(corpus.codes, tiny_tokenizer.spec.fingerprint, cache_dir=tmp_path / "cache")
    again = CodeStore.open(
        corpus.codes, tiny_tokenizer.spec.fingerprint, cache_dir=tmp_path / "cache", write_cache=False
    )
    assert isinstance(again.codes, np.memmap) and again.keys == cached.keys
    np.testing.assert_array_equal(np.asarray(again.codes), cached.codes)


def test_foreign_fingerprint_is_refused_in_one_line(corpus):
    with pytest.raises(FingerprintError) as e:
        CodeStore.open(corpus.codes, "f" * 64)
    assert "\n" not in str(e.value) and "ffffffffffff" in str(e.value)


# ---------------------------------------------------------------- join + bad samples
def _cfg(corpus, data, **kw):
    kw.setdefault("packing", PackingConfig(max_len=256, rows=2))
    return DataConfig(data=[str(data)], codes=str(corpus.codes), images=str(corpus.images), **kw)


def test_join_caption_free_and_text_only(corpus, tiny_tokenizer, llm_tok):
    store = _store(corpus, tiny_tokenizer)
    data = build_training_data(_cfg(corpus, corpus.sft, caption_free_ratio=1.0), vicuna_v1(), llm_tok, store, True)
    assert data.n_conversations == 10 and data.n_caption_free == 3  # 12 images, 9 captioned
    by_id = {s.sample_id: s for s in data.samples}
    assert by_id["text-only"].key is None and not by_id["text-only"].encoded.image_mask.any()
    free = [s for s in data.samples if s.sample_id.startswith("caption-free:")]
    assert sorted(s.key for s in free) == corpus.keys[9:]
    assert all(not s.encoded.trained.any() and s.encoded.image_mask.sum() == HW for s in free)
    half = build_training_data(_cfg(corpus, corpus.sft, caption_free_ratio=0.2), vicuna_v1(), llm_tok, store, True)
    assert half.n_caption_free == round(0.2 / 0.8 * 10)


def test_bad_samples_counted_listed_and_skipped_only_on_request(corpus, tiny_tokenizer, llm_tok, tmp_path):
    recs = json.loads(corpus.pretrain.read_text())
    recs[1]["image"] = "nowhere/absent.jpg"  # key in no shard
    recs[2]["conversations"] = [{"from": "gpt", "value": "x"}]  # malformed
    recs[3]["conversations"][0]["value"] = "<image> <image>"  # malformed
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(recs))
    images = tmp_path / "images"  # online: one image file missing
    images.mkdir()
    for k in corpus.keys:
        if k != corpus.keys[4]:
            (images / k).parent.mkdir(parents=True, exist_ok=True)
            (images / k).write_bytes((corpus.images / k).read_bytes())
    store = _store(corpus, tiny_tokenizer)
    cfg = DataConfig(data=[str(bad_json)], codes=str(corpus.codes), images=str(images), vision_input="online")
    with pytest.raises(DataError) as e:
        build_training_data(cfg, plain(), llm_tok, store, True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("4 bad samples (2 malformed, 1 missing image, 1 not in shards)")
    assert "pt1" in msg and "--skip-bad-samples" in msg
    cfg.skip_bad_samples = True
    data = build_training_data(cfg, plain(), llm_tok, store, True)
    assert sorted(b.sample_id for b in data.bad) == ["pt1", "pt2", "pt3", "pt4"]
    assert sorted(s.sample_id for s in data.samples) == ["pt0", "pt5", "pt6", "pt7", "pt8"]


def test_too_long_samples(corpus, tiny_tokenizer, llm_tok):
    store = _store(corpus, tiny_tokenizer)
    cfg = _cfg(corpus, corpus.sft, packing=PackingConfig(max_len=40))  # image block (49) cannot fit
    with pytest.raises(DataError, match="too long"):
        build_training_data(cfg, vicuna_v1(), llm_tok, store, False)
    cfg = _cfg(corpus, corpus.pretrain, packing=PackingConfig(max_len=HW + 3))  # captions truncated
    data = build_training_data(cfg, plain(), llm_tok, store, False)
    assert max(data.lengths) == HW + 3 and len(data.samples) == 9


# ---------------------------------------------------------------- packing
def test_packing_plan_properties():
    rng = np.random.default_rng(0)
    lengths = (rng.integers(20, 600, size=300)).tolist()
    cfg = PackingConfig(max_len=1024, rows=4, window=64)
    plan = plan_epoch(lengths, cfg, seed=3, epoch=0)
    assert plan == plan_epoch(lengths, cfg, seed=3, epoch=0)
    assert plan != plan_epoch(lengths, cfg, seed=3, epoch=1)
    flat = [i for mb in plan for row in mb for i in row]
    assert sorted(flat) == list(range(300))  # every sample exactly once
    assert all(sum(lengths[i] for i in row) <= 1024 for mb in plan for row in mb)
    unpacked = plan_epoch(lengths, PackingConfig(max_len=1024, rows=4, pack=False), seed=3, epoch=0)
    assert padding_waste(plan, lengths) < 0.1 < padding_waste(unpacked, lengths)
    shards = [shard_for_rank(plan, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [id(mb) for s in shards for mb in s]
    assert len(seen) == len(set(seen)) == len(plan) - len(plan) % 3


def test_best_fit_matches_exhaustive_on_easy_case():
    # 6 samples that pair up perfectly into 3 full rows
    assert sorted(map(sorted, best_fit_rows(list(range(6)), [7, 3, 5, 5, 2, 8], 10, 6))) == [[0, 1], [2, 3], [4, 5]]


# ---------------------------------------------------------------- collation + loader
@pytest.mark.parametrize("mode", ["codes", "online"])
def test_collator_builds_consistent_batches(corpus, tiny_tokenizer, llm_tok, mode):
    store = _store(corpus, tiny_tokenizer)
    data = build_training_data(_cfg(corpus, corpus.sft, caption_free_ratio=1.0), vicuna_v1(), llm_tok, store, True)
    ctx = SourceContext(
        store=store,
        images=str(corpus.images),
        tower=VisionTower.from_tokenizer(tiny_tokenizer),
        preprocess=store.meta.preprocess,
    )
    col = Collator(data, get_vision_input(mode).source(ctx), llm_tok.pad_token_id)
    plan = plan_epoch(data.lengths, PackingConfig(max_len=400, rows=2), seed=0, epoch=0)
    mb = max(plan, key=lambda m: sum(len(r) for r in m))
    b = col(mb)
    keys = [data.samples[i].key for row in mb for i in row if data.samples[i].key is not None]
    assert b.num_images == len(keys) and int(b.image_mask.sum()) == HW * len(keys)
    want_codes = np.stack([corpus.codes_by_key[k].reshape(HW, -1) for k in keys])
    np.testing.assert_array_equal(b.visual_codes.numpy(), want_codes)
    if mode == "codes":
        np.testing.assert_array_equal(b.vision.numpy(), want_codes.reshape(len(keys), 7, 7, -1))
    else:
        want = tiny_tokenizer.preprocess_images([corpus.images / k for k in keys], mode=store.meta.preprocess)
        np.testing.assert_array_equal(b.vision.numpy(), want)
    for r, row in enumerate(mb):
        t = 0
        for n, i in enumerate(row, start=1):
            e = data.samples[i].encoded
            sl = slice(t, t + len(e))
            assert (b.sample_ids[r, sl] == n).all() and b.position_ids[r, sl].tolist() == list(range(len(e)))
            assert b.input_ids[r, sl].tolist() == e.input_ids.tolist()
            assert b.labels[r, sl].tolist() == e.labels.tolist()
            t += len(e)
        assert (b.sample_ids[r, t:] == 0).all() and (b.labels[r, t:] == IGNORE_INDEX).all()
    assert b.labels[b.image_mask].eq(IGNORE_INDEX).all()


def test_loader_resumes_mid_epoch_on_the_next_micro_batch(corpus, tiny_tokenizer, llm_tok):
    store = _store(corpus, tiny_tokenizer)
    data = build_training_data(_cfg(corpus, corpus.sft, caption_free_ratio=1.0), vicuna_v1(), llm_tok, store, False)
    col = Collator(data, CodesSource(store), 0)
    pk = PackingConfig(max_len=200, rows=1)
    ref = PackedLoader(data.lengths, col, pk, seed=5)
    n = ref.micro_batches_per_epoch()
    it = iter(ref)
    stream = [next(it) for _ in range(n + 3)]  # crosses an epoch boundary
    a = PackedLoader(data.lengths, col, pk, seed=5)
    it = iter(a)
    for _ in range(n - 2):
        next(it)
    state = a.state_dict()
    assert state["epoch"] == 0 and state["position"] == n - 2
    b = PackedLoader(data.lengths, col, pk, seed=5)
    b.load_state_dict(state)
    rest = list(zip(range(5), iter(b)))
    for (_, got), want in zip(rest, stream[n - 2 :]):
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.sample_ids, want.sample_ids)
    assert b.state_dict()["epoch"] == 1
    ranks = [PackedLoader(data.lengths, col, pk, seed=5, rank=r, world=2) for r in range(2)]
    firsts = [next(iter(x)) for x in ranks]
    assert torch.equal(firsts[0].input_ids, stream[0].input_ids) and torch.equal(
        firsts[1].input_ids, stream[1].input_ids
    )


def test_caption_text_encodes_index(corpus, llm_tok):
    # the test corpus is self-describing: decoding a trained span gives its caption back
    enc = encode_conversation(
        plain(), validate_turns(json.loads(corpus.pretrain.read_text())[4]["conversations"], True), llm_tok, HW
    )
    assert llm_tok.decode(enc.input_ids[enc.trained].tolist()) == caption(4) + "\n"


def test_loader_workers_give_the_same_batches(corpus, tiny_tokenizer, llm_tok):
    store = _store(corpus, tiny_tokenizer)
    data = build_training_data(_cfg(corpus, corpus.sft), vicuna_v1(), llm_tok, store, False)
    col = Collator(data, CodesSource(store), 0)
    pk = PackingConfig(max_len=200, rows=2)
    a = PackedLoader(data.lengths, col, pk, seed=2)
    b = PackedLoader(data.lengths, col, pk, seed=2, num_workers=1)
    for x, y, _ in zip(iter(a), iter(b), range(a.micro_batches_per_epoch() + 1)):
        assert torch.equal(x.input_ids, y.input_ids) and x.num_images == y.num_images
        if x.num_images:
            assert torch.equal(x.vision, y.vision)
    assert a.state_dict() == b.state_dict()


# ---------------------------------------------------------------- vision input strategies
def test_one_list_of_vision_inputs():
    from asvr.train.config import ModelConfig
    from asvr.train.model.vision_input import VISION_INPUTS

    assert tuple(VISION_INPUTS) == ("online", "features", "codes")
    assert ModelConfig(llm={"model_type": "llama"}).vision_input == "codes"  # as the CLI's default
    with pytest.raises(ValueError, match="one of"):
        ModelConfig(llm={"model_type": "llama"}, vision_input="pixels")
    with pytest.raises(ValueError, match="--images"):
        DataConfig(data=["x.json"], codes="c", vision_input="features")


def test_feature_cache_adds_only_missing_rows_and_features_need_images_only_for_them(
    corpus, tiny_tokenizer, llm_tok, tmp_path
):
    from asvr.train.data.sources import FeatureCache

    store = _store(corpus, tiny_tokenizer)
    tower = VisionTower.from_tokenizer(tiny_tokenizer)
    calls: list[list[str]] = []

    def featurize(keys):
        calls.append(list(keys))
        return tower.features(tower.preprocess_images([corpus.images / k for k in keys], "square")).numpy()

    cache = FeatureCache.open(tmp_path, store, tower.spec.fingerprint)
    cache.fill(corpus.keys[:3], featurize, progress=False)
    cache.fill(corpus.keys[:5], featurize, progress=False)
    assert sorted(k for c in calls for k in c) == sorted(corpus.keys[:5])  # each key computed once
    again = FeatureCache.open(tmp_path, store, tower.spec.fingerprint)
    want = featurize(corpus.keys[:5])
    np.testing.assert_allclose(np.stack([again.get(k) for k in corpus.keys[:5]]), want, rtol=1e-6)
    mode = get_vision_input("features")
    assert not mode.needs_image(corpus.keys[0], again) and mode.needs_image(corpus.keys[6], again)
    assert FeatureCache.open(tmp_path, store, "0" * 64).path != again.path  # another tower, another file


def test_asvr_train_preview_prints_samples_and_does_not_train(corpus, tiny_tokenizer_dir, llm_tok, tmp_path, capsys):
    from asvr.train.cli import main

    run = tmp_path / "run"
    argv = [
        "--model",
        str(corpus.llm),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--codes",
        str(corpus.codes),
        "--data",
        str(corpus.sft),
        "--stage",
        "sft",
        "--output-dir",
        str(run),
        "--preview",
        "3",
    ]
    assert main(argv) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["id"] for l in lines] == ["sft0", "sft1", "sft2"] and not run.exists()
    recs = json.loads(corpus.sft.read_text())
    for l, rec in zip(lines, recs):
        enc = encode_conversation(vicuna_v1(), validate_turns(rec["conversations"], True), llm_tok, HW)
        assert l["input_ids"] == enc.input_ids.tolist() and l["labels"] == enc.labels.tolist()
        ((a, b),) = l["image_positions"]
        assert b - a == HW and l["n_tokens"] == len(enc) and l["image"] == rec["image"]
        assert l["text"].startswith(vicuna_v1().system + " USER: <image>\nWhat is in image")
        trained = [t for t in l["labels"] if t != IGNORE_INDEX]
        assert (
            llm_tok.decode(trained) == f" {rec['conversations'][1]['value']}</s> {rec['conversations'][3]['value']}</s>"
        )
    assert main(argv[:-1] + ["-1"]) == 2


def test_grey_image_codes_reach_the_batch_for_text_only_samples(corpus, tiny_tokenizer, llm_tok):
    from asvr.train.data.dataset import grey_image_codes

    store = _store(corpus, tiny_tokenizer)
    data = build_training_data(_cfg(corpus, corpus.sft), vicuna_v1(), llm_tok, store, False)
    size = tiny_tokenizer.preprocess_config().image_size
    grey = grey_image_codes(tiny_tokenizer, size)
    # LLaVA's dummy is torch.zeros(3, S, S) in normalised pixel space (the mean colour)
    assert grey.shape == (HW, store.meta.depth)
    zeros = np.zeros((2, 3, size, size), np.float32)
    np.testing.assert_array_equal(grey, tiny_tokenizer.encode_pixels(zeros)[1].reshape(HW, -1).numpy())
    i_txt = next(i for i, s in enumerate(data.samples) if s.key is None)
    i_img = next(i for i, s in enumerate(data.samples) if s.key is not None)
    on = Collator(data, CodesSource(store), 0, grey_codes=grey)([[i_txt, i_img]])
    assert on.text_only_codes.shape == (1, HW, store.meta.depth) and on.num_images == 1
    np.testing.assert_array_equal(on.text_only_codes[0].numpy(), grey)
    assert Collator(data, CodesSource(store), 0)([[i_txt, i_img]]).text_only_codes is None
    assert Collator(data, CodesSource(store), 0, grey_codes=grey)([[i_img]]).text_only_codes is None


def test_a_sample_whose_labels_cannot_be_exact_is_listed_not_trained_masked(corpus, tiny_tokenizer, tmp_path):
    """LLaVA would train it with shifted labels or all labels masked; here it is a bad sample."""
    from test_train_templates import SlowLlama, _train_sp

    tok = SlowLlama(_train_sp([":▁3"]), legacy=True)  # joins 'ASSISTANT:' to an answer starting with '3'
    recs = [
        {"id": "ok", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]},
        {"id": "joined", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "3"}]},
    ]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    store = _store(corpus, tiny_tokenizer)
    with pytest.raises(DataError, match=r"1 bad samples \(1 malformed\): joined \(an answer boundary falls inside"):
        build_training_data(_cfg(corpus, f), vicuna_v1(), tok, store, False)
    data = build_training_data(_cfg(corpus, f, skip_bad_samples=True), vicuna_v1(), tok, store, False)
    assert [s.sample_id for s in data.samples] == ["ok"] and [b.sample_id for b in data.bad] == ["joined"]
    assert data.samples[0].encoded.trained.any()
