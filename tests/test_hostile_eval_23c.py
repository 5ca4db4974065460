"""Issue 23, eval and training data half, the behaviours merged without a test: a benchmark
prompt longer than the model's context is refused naming the item (before: 17 GB and the OOM
killer); duplicate ids in a benchmark file are refused (before: 33% reported for 67%); bench
images outside the image root are refused; lone surrogates in bench questions and in LLaVA
training files are one line; a broken ``.jsonl`` line is named by its real number.  A tiny
exported model (random weights, real tokenizer) on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from asvr.eval.cli import main as eval_main
from asvr.train.cli import main as train_main
from test_eval_model import _run
from train_corpus import make_corpus, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    return make_corpus(tmp_path_factory.mktemp("corpus23c"), tiny_tokenizer, n_images=4, n_captioned=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus, tiny_tokenizer):
    return _run(tmp_path_factory.mktemp("run23c"), corpus, tiny_tokenizer, "codes")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err[:-1]


def _write_jsonl(path: Path, recs: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs), encoding="utf-8")
    return path


def _bench(run, bench: Path, images: Path, out: Path, *extra: str) -> int:
    return eval_main(
        ["bench", "--model", str(run), "--bench", str(bench), "--images", str(images), "--out", str(out)]
        + ["--max-new-tokens", "4", "--quiet", *extra]
    )


def _score(bench: Path, preds: Path, out: Path, *extra: str) -> int:
    return eval_main(["score", "--bench", str(bench), "--predictions", str(preds), "--out", str(out), *extra])


# --------------------------------------------------------------------------- 7: prompts and the context
def test_a_question_longer_than_the_context_is_refused_naming_the_item(run, corpus, tmp_path, capsys):
    from asvr.eval.formats.base import read_bench
    from asvr.eval.generate import encode_prompt, question_text
    from asvr.eval.loading import load_for_eval

    context = json.loads((corpus.llm / "config.json").read_text())["max_position_embeddings"]
    key = corpus.keys[0]
    long_q = "Is there a red square near the blue circle? " * 2300  # 100k characters
    bench = _write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"id": "short", "image": key, "question": "Is it red?", "answer": "yes"},
            {"id": "long", "image": key, "question": long_q, "answer": "no"},
        ],
    )
    lm = load_for_eval(run, device="cpu", need_encoder=True)
    item = read_bench(bench, images=corpus.images)[1][1]
    n = len(encode_prompt(lm, question_text(item, "lmms-eval"), True)[0])
    assert n > context
    out = tmp_path / "rep"
    assert _bench(run, bench, corpus.images, out) == 2
    assert _one_line(capsys) == (
        f"asvr-eval bench: error: {bench}:2: item 'long' needs {n} prompt tokens + 4 new (--max-new-tokens), "
        f"more than the model's context of {context} positions: the question is too long (refused, not truncated)"
    )
    assert not (out / "predictions.jsonl").exists()  # refused before the first answer
    # a question that fits with its answer is asked (the limit counts the new tokens too)
    _write_jsonl(bench, [{"id": "short", "image": key, "question": "Is it red?", "answer": "yes"}])
    assert _bench(run, bench, corpus.images, out) == 0
    capsys.readouterr()


# --------------------------------------------------------------------------- 7: duplicate ids
def test_duplicate_ids_in_a_bench_file_are_refused(run, corpus, tmp_path, capsys):
    key = corpus.keys[0]
    bench = _write_jsonl(
        tmp_path / "dup.jsonl",
        [
            {"id": "q1", "image": key, "question": "Is it red?", "answer": "yes"},
            {"id": "q2", "image": key, "question": "Is it blue?", "answer": "no"},
            {"id": "q1", "image": key, "question": "Is it green?", "answer": "no"},
        ],
    )
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "prediction": "yes"}, {"id": "q2", "prediction": "no"}])
    want = (
        f"{bench}:3: duplicate id 'q1' (first at {bench}:1): ids must be unique, predictions are matched to "
        "questions by id"
    )
    assert _score(bench, preds, tmp_path / "s", "--images", str(corpus.images)) == 2  # before: 1 of 3 right
    assert _one_line(capsys) == f"asvr-eval score: error: {want}"
    assert _bench(run, bench, corpus.images, tmp_path / "b") == 2
    assert _one_line(capsys) == f"asvr-eval bench: error: {want}"
    # and a prediction given twice
    good = _write_jsonl(bench, [{"id": "q1", "image": key, "question": "Is it red?", "answer": "yes"}])
    twice = _write_jsonl(tmp_path / "p2.jsonl", [{"id": "q1", "prediction": "yes"}, {"id": "q1", "prediction": "no"}])
    assert _score(good, twice, tmp_path / "s2", "--images", str(corpus.images)) == 2
    assert _one_line(capsys) == f"asvr-eval score: error: {twice}:2: a second prediction for id 'q1' (first at line 1)"


# --------------------------------------------------------------------------- 7: images outside the root
def test_bench_images_outside_the_image_root_are_refused(run, corpus, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "in.jpg").write_bytes((corpus.images / corpus.keys[0]).read_bytes())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((corpus.images / corpus.keys[1]).read_bytes())
    os.symlink(secret, images / "link.jpg")
    (tmp_path / "b").mkdir()
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prediction": "yes"}])
    cases = {
        "../secret.jpg": f"image '../secret.jpg': image path escapes {images}",
        str(secret): f"image {str(secret)!r}: image path is absolute: it escapes {images}",
        "link.jpg": f"image 'link.jpg': image path escapes {images}",
    }
    for ref, why in cases.items():
        bench = _write_jsonl(
            tmp_path / "b" / "out.jsonl",
            [
                {"id": "ok", "image": "in.jpg", "question": "Is it red?", "answer": "yes"},
                {"id": "x", "image": ref, "question": "Is it red?", "answer": "yes"},
            ],
        )
        assert _score(bench, preds, tmp_path / "s", "--images", str(images)) == 2, ref  # before: opened
        assert _one_line(capsys) == f"asvr-eval score: error: {bench}:2: {why}", ref
    assert _bench(run, bench, images, tmp_path / "r") == 2
    assert _one_line(capsys) == f"asvr-eval bench: error: {bench}:2: image 'link.jpg': image path escapes {images}"
    # the same file, inside the root: read
    _write_jsonl(bench, [{"id": "x", "image": "in.jpg", "question": "Is it red?", "answer": "yes"}])
    assert _score(bench, preds, tmp_path / "s", "--images", str(images)) == 0
    capsys.readouterr()


# --------------------------------------------------------------------------- 5, 6: surrogates and line numbers
def test_lone_surrogates_in_bench_questions_are_one_line(run, corpus, tmp_path, capsys):
    key = corpus.keys[0]
    good = json.dumps({"id": "q1", "image": key, "question": "Is it red?", "answer": "yes"})
    bad = json.dumps({"id": "q2", "image": key, "question": "Is it \\ud800 red?", "answer": "no"})
    bench = _write_jsonl(tmp_path / "s.jsonl", [good, bad.replace("\\\\ud800", "\\ud800")])
    pope = _write_jsonl(
        tmp_path / "coco_pope.json",
        [
            json.dumps({"question_id": 1, "image": key, "text": "Is there a \\udc00?", "label": "yes"}).replace(
                "\\\\", "\\"
            )
        ],
    )
    why = "holds a lone UTF-16 surrogate escape (such as \\ud800): not valid Unicode"
    assert _bench(run, bench, corpus.images, tmp_path / "o") == 2  # before: UnicodeEncodeError in the tokenizer
    assert _one_line(capsys) == f"asvr-eval bench: error: {bench}:2: question {why}"
    assert _bench(run, pope, corpus.images, tmp_path / "o") == 2
    assert _one_line(capsys) == f"asvr-eval bench: error: {pope}:1: text {why}"


def test_a_broken_bench_line_is_named_by_its_real_number(corpus, tmp_path, capsys):
    key = corpus.keys[0]
    bench = tmp_path / "b.jsonl"
    first = {"id": "q1", "image": key, "question": "Is it red?\u2028Answer yes or no.", "answer": "yes"}
    bench.write_text(
        json.dumps(first, ensure_ascii=False) + "\n" + json.dumps({**first, "id": "q2"}) + "\n{broken\n",
        encoding="utf-8",
    )
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "prediction": "yes"}])
    assert _score(bench, preds, tmp_path / "s", "--images", str(corpus.images)) == 2  # before: line 1
    assert _one_line(capsys) == (
        f"asvr-eval score: error: {bench}:3: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    bench.write_text(json.dumps(first, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _score(bench, preds, tmp_path / "s", "--images", str(corpus.images)) == 0
    capsys.readouterr()
    # predictions written by another tool, U+2028 kept literal: read, not split
    preds.write_text(json.dumps({"id": "q1", "prediction": "yes\u2028"}, ensure_ascii=False) + "\n{x\n")
    assert _score(bench, preds, tmp_path / "s", "--images", str(corpus.images)) == 2
    assert _one_line(capsys) == (
        f"asvr-eval score: error: {preds}:2: not JSON (Expecting property name enclosed in double quotes)"
    )


def test_lone_surrogates_in_training_data_are_one_line(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    recs = json.loads(corpus.sft.read_text())[:2]
    turn = json.dumps(recs[1]).replace(json.dumps(recs[1]["conversations"][1]["value"]), '"a \\ud800 b"')
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps(recs[0]) + "\n" + turn + "\n")
    path_rec = dict(recs[0], image="d0/\\udcff.jpg")
    data2 = tmp_path / "sft2.json"
    data2.write_text(json.dumps([recs[1], path_rec]).replace("\\\\udcff", "\\udcff"))
    why = "holds a lone UTF-16 surrogate escape (such as \\ud800): not valid Unicode text; fix or remove the record"
    want = {
        data: f"{data}: line 2 (id {recs[1]['id']!r}): conversations[1].value {why}",
        data2: f"{data2}: record 1 (id {recs[0]['id']!r}): image {why}",
    }
    for f, line in want.items():
        args = train_args(corpus, tiny_tokenizer_dir, tmp_path / f"r_{f.stem}", data=f)
        args += ["--template", "vicuna_v1", "--vision-input", "codes"]
        assert train_main(args) == 2
        assert _one_line(capsys) == f"asvr-train: error: {line}"
