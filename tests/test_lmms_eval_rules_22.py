"""Prompts and multiple-choice scoring equal lmms-eval's, against lmms-eval's task functions
re-implemented here from its code (lmms_eval/tasks/mme/utils.py ``mme_doc_to_text``,
pope/utils.py ``pope_doc_to_text``, mmbench/en_utils.py ``mmbench_doc_to_text`` with
``MMBench_Evaluator.create_options_prompt`` / ``can_infer`` / ``eval_sub_data``'s circular
rule, scienceqa/utils.py ``sqa_doc_to_text`` / ``sqa_process_results``; the ``default``
kwargs of their yaml files).  Benchmark files are written here and read by the readers."""

from __future__ import annotations

import json
import math
import string

import pytest

from asvr.eval.bench import score_items
from asvr.eval.formats.base import read_bench
from asvr.eval.generate import question_text

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


# ------------------------------------------------------------------ lmms-eval, re-implemented
def ref_mme_doc_to_text(doc, kw):
    question = doc["question"].strip()
    if "pre_prompt" in kw and kw["pre_prompt"] != "":
        question = question.replace(" Please answer yes or no.", "")
        question = f"{kw['pre_prompt']}{question}"
    if "post_prompt" in kw and kw["post_prompt"] != "":
        question = question.replace(" Please answer yes or no.", "")
        question = f"{question}{kw['post_prompt']}"
    return question


def ref_pope_doc_to_text(doc, kw):
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def _notna(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def ref_mmbench_doc_to_text(doc, kw):
    available = set(doc.keys()) & set("ABCDE")
    options = {c: doc[c] for c in available if doc[c]}
    prompt = "There are several options:\n"
    for key, item in dict(sorted(options.items())).items():
        if _notna(item) and item != "nan":
            prompt += f"{key}. {item}\n"
    prompt = prompt.rstrip("\n")
    hint = doc["hint"]
    query = f"{hint} {doc['question']} {prompt}" if _notna(hint) and hint != "nan" else f"{doc['question']} {prompt}"
    return f"{query}\n{kw['post_prompt']}" if kw else query


def ref_sqa_doc_to_text(doc, kw):
    context, question, choices = doc["hint"], doc["question"], doc["choices"]
    options = [chr(ord("A") + i) for i in range(len(choices))]
    choices_str = "\n".join(f"{o}. {c}" for o, c in zip(options, choices))
    if context:
        context = f"Context: {context}\n"
    return f"{kw['pre_prompt']}{context}{question}\n{choices_str}{kw['post_prompt']}"


def ref_can_infer_option(answer, num_choice=5):
    choices = string.ascii_uppercase[:num_choice]

    def count(splits, choices="ABCD", prefix="", suffix=""):
        return sum(1 for c in choices if prefix + c + suffix in splits)

    splits = [x.strip() for x in answer.split()]
    if count(splits, choices) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    tups = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ").")]
    tups += [(":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]
    for pre, suf in tups:
        if count(splits, choices, prefix=pre, suffix=suf) == 1:
            for ch in choices:
                if pre + ch + suf in splits:
                    return ch
    return False


def ref_can_infer_text(answer, choices):
    answer = answer.lower()
    choices = {k: str(v).lower() for k, v in choices.items()}
    cands = [k for k in choices if choices[k] in answer]
    return cands[0] if len(cands) == 1 else False


def ref_can_infer(answer, choices):
    return ref_can_infer_option(answer) or ref_can_infer_text(answer, choices)


def ref_sqa_correct(pred, target_letter):
    target = target_letter.strip().lower()
    pred = pred.strip()
    if pred.lower() == target:
        return True
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0].lower() == target
    return False


# ------------------------------------------------------------------ files
OPTIONS = ["red", "green", "blue", "yellow"]
TRICKY = [
    "B",
    "B.",
    "(B)",
    "b",
    "B green",
    "B. green",
    "B) green",
    "The answer is B.",
    "Option: B",
    "green",
    "It is green.",
    "Green!",
    "A green apple on the table",
    "A",
    "I think B or C",
    "E",
    "light green and red",
    ":B",
    "B,",
    "answer B",
    "  B  ",
    "b.",
    "The colour is (B).",
]


def _tsv(path, rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer", "category")):
    path.write_text(
        "\t".join(header) + "\n" + "".join("\t".join(str(r.get(h, "")) for h in header) + "\n" for r in rows)
    )
    return path


def test_mme_and_pope_prompts(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    q = "Is there a dog in the image? Please answer yes or no."
    (tmp_path / "existence.txt").write_text(f"a.png\t{q}\tYes\na.png\t  Is it red?\tNo\n")
    _, items = read_bench(tmp_path / "existence.txt")
    kw = {"pre_prompt": "", "post_prompt": SHORT}
    assert [question_text(it) for it in items] == [ref_mme_doc_to_text({"question": q}, kw) for q in (q, "Is it red?")]
    assert question_text(items[0]) == "Is there a dog in the image?" + SHORT
    # the old prompt, as an option: both instructions kept
    assert question_text(items[0], "llava") == q + SHORT
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": " Is there a cat? ", "label": "no"}) + "\n")
    _, items = read_bench(pope)
    assert question_text(items[0]) == ref_pope_doc_to_text({"question": " Is there a cat? "}, kw)


def test_mmbench_and_scienceqa_prompts(tmp_path):
    rows = [
        {"index": 0, "question": "What colour?", "hint": "A toy.", "A": "red", "B": "green", "answer": "B"},
        {"index": 1, "question": "Which one?", "hint": "nan", **dict(zip("ABCD", OPTIONS)), "answer": "C"},
    ]
    kw = {"pre_prompt": "", "post_prompt": LETTER}
    fmt, items = read_bench(_tsv(tmp_path / "mmbench_dev_en.tsv", rows))
    assert fmt == "mmbench"
    for it, row in zip(items, rows):
        doc = {**{c: row.get(c, float("nan")) for c in "ABCD"}, **row}
        assert question_text(it) == ref_mmbench_doc_to_text(doc, kw)
    want = "A toy. What colour? There are several options:\nA. red\nB. green\n"
    assert question_text(items[0]) == want + LETTER
    fmt, items = read_bench(_tsv(tmp_path / "ScienceQA_TEST.tsv", rows))
    assert fmt == "scienceqa"
    for it, row in zip(items, rows):
        doc = {
            "hint": "" if row["hint"] == "nan" else row["hint"],
            "question": row["question"],
            "choices": [row[c] for c in "ABCD" if row.get(c)],
        }
        assert question_text(it) == ref_sqa_doc_to_text(doc, kw)
    assert question_text(items[0], "llava").startswith("A toy.\nWhat colour?\nA. red\nB. green\n")


@pytest.mark.parametrize("fmt", ["mmbench", "scienceqa"])
def test_multiple_choice_scored_as_lmms_eval(tmp_path, fmt):
    rows = [
        {"index": i, "question": "Colour?", **dict(zip("ABCD", OPTIONS)), "answer": "B"} for i in range(len(TRICKY))
    ]
    _, items = read_bench(_tsv(tmp_path / f"{fmt}.tsv", rows), fmt)
    got = [r["correct"] for r in score_items(items, TRICKY, fmt)]
    if fmt == "mmbench":
        choices = dict(zip("ABCD", OPTIONS))
        want = [ref_can_infer(a, dict(choices)) == "B" for a in TRICKY]
    else:
        want = [ref_sqa_correct(a, "B") for a in TRICKY]
    assert got == want
    lenient = [r["correct"] for r in score_items(items, TRICKY, fmt, "lenient")]
    assert lenient != want  # the two rules differ on these answers (counts in the closing note)


def test_mmbench_circular_accuracy(tmp_path):
    """Question 0 has a rotated copy 1000000 answered wrongly: lmms-eval counts it wrong."""
    from asvr.eval.bench import bench_metrics

    rows = [
        {"index": 0, "question": "Q?", "A": "x", "B": "y", "answer": "A"},
        {"index": 1000000, "question": "Q?", "A": "y", "B": "x", "answer": "B"},
        {"index": 1, "question": "R?", "A": "x", "B": "y", "answer": "B"},
        {"index": 1000001, "question": "R?", "A": "y", "B": "x", "answer": "A"},
    ]
    fmt, items = read_bench(_tsv(tmp_path / "mmb.tsv", rows))
    records = score_items(items, ["A", "A", "B", "A"], fmt)
    m = bench_metrics(fmt, items, records)
    assert m["acc"] == 0.75 and m["circular_acc"] == 0.5 and m["circular_questions"] == 2
    assert m["scoring"] == "lmms-eval"
