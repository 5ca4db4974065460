"""asvr.eval.scoring: answer parsing and metrics on hand-made cases."""

from __future__ import annotations

import pytest

from asvr.eval.scoring import (
    grouped_accuracy,
    mme_metrics,
    normalize_answer,
    parse_answer,
    parse_choice,
    parse_yes_no,
    pope_metrics,
)


@pytest.mark.parametrize(
    "text, want",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("  YES, there is a cat.", "yes"),
        ("No", "no"),
        ("no!", "no"),
        ("There is no dog in the image.", "no"),
        ("It is not red.", "no"),
        ("I think yes", "yes"),
        ("The cat", None),
        ("", None),
        ("Yes, but no", "yes"),
    ],
)
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) == want


OPTS = ["red", "green", "blue square", "a yellow star"]


@pytest.mark.parametrize(
    "text, want",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("C) blue square", "C"),
        ("A. red", "A"),
        ("D: a yellow star", "D"),
        ("The answer is C.", "C"),
        ("Answer: D", "D"),
        ("option B", "B"),
        ("green", "B"),
        ("Green.", "B"),
        ("It is a blue square.", "C"),
        ("yellow star", "D"),
        ("A red circle", "A"),  # 'A' is an article here; 'red' is option A's text
        ("A purple circle", None),  # an article and no option text: not a letter
        ("E", None),
        ("red or green", None),
        ("", None),
        ("b", None),
    ],
)
def test_parse_choice(text, want):
    assert parse_choice(text, OPTS) == want


def test_normalize_answer():
    assert normalize_answer("The Two!") == "2"
    assert normalize_answer("  a Blue   square. ") == "blue square"
    assert normalize_answer("1,000") == "1000"
    assert parse_answer("short", "Three.") == parse_answer("short", "3") == "3"
    assert parse_answer("short", "...") is None
    with pytest.raises(ValueError):
        parse_answer("essay", "x")


def test_pope_metrics_by_hand():
    parsed = ["yes", "no", "yes", None, "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    m = pope_metrics(parsed, labels)
    # tp: 0, 5; fp: 2; fn: 3 (unparsed), 4; tn: 1
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["unparsed"]) == (2, 1, 2, 1, 1)
    assert m["acc"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    # an unparsed answer to a 'no' question is wrong, not a true negative
    assert pope_metrics([None], ["no"])["acc"] == 0.0


def test_mme_acc_plus_pairs():
    cats = ["count"] * 6 + ["OCR"] * 4 + ["code_reasoning"] * 2
    imgs = ["a", "a", "b", "b", "c", "c", "x", "x", "y", "y", "z", "z"]
    right = [True, True, True, False, False, False, True, True, True, True, False, True]
    m = mme_metrics(cats, imgs, right)
    c = m["categories"]
    assert c["count"]["acc"] == pytest.approx(3 / 6) and c["count"]["acc_plus"] == pytest.approx(1 / 3)
    assert c["count"]["score"] == pytest.approx(100 * (0.5 + 1 / 3))
    assert c["OCR"]["acc"] == 1.0 and c["OCR"]["acc_plus"] == 1.0 and c["OCR"]["score"] == pytest.approx(200)
    assert c["code_reasoning"]["acc_plus"] == 0.0 and c["code_reasoning"]["images_without_a_pair"] == 0
    t = m["totals"]
    assert t["perception"]["score"] == pytest.approx(c["count"]["score"] + 200)
    assert t["cognition"]["score"] == pytest.approx(50.0)
    # the same image name in two categories is two images
    m2 = mme_metrics(["p", "p", "q", "q"], ["i", "i", "i", "i"], [True, True, True, False])
    assert m2["categories"]["p"]["acc_plus"] == 1.0 and m2["categories"]["q"]["acc_plus"] == 0.0


def test_grouped_accuracy():
    g = grouped_accuracy(["a", "b", "a", None], [True, False, False, True])
    assert g == {"a": {"n": 2, "correct": 1, "acc": 0.5}, "b": {"n": 1, "correct": 0, "acc": 0.0}}


# ---------------------------------------------------------------- lmms-eval scoring (POPE, MME)
# 26 tricky answers; each is scored on a 'yes' and on a 'no' item below
TRICKY = [
    "Yes",
    "No",
    "yes.",
    "No.",
    " YES ",
    "no\n",
    "Yes, there is a cat.",
    "No, there is no dog.",
    "There is no dog.",
    "It is not red.",
    "I think yes",
    "y",
    "n",
    "Y.",
    "N",
    "yeah",
    "nope",
    "Not at all.",
    "None",
    "Nothing",
    "",
    "The cat",
    "yes and no",
    "Yes.\nNo.",
    "noo",
    "...yes",
]


def lmms_pope_reference(preds, labels):
    """lmms-eval's POPE rules as documented in lmms_eval/tasks/pope/utils.py, written out here."""
    p = [x.lower().strip() for x in preds]
    g = [x.lower().strip() for x in labels]
    acc = sum(a == b for a, b in zip(p, g)) / len(p)
    tp = sum(a == "yes" and b == "yes" for a, b in zip(p, g))
    fp = sum(a == "yes" and b == "no" for a, b in zip(p, g))
    fn = sum(a == "no" and b == "yes" for a, b in zip(p, g))  # only an exact 'no' is a false negative
    prec = tp / (tp + fp) if tp + fp else 0
    rec = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0
    yes_ratio = g.count("yes") / (g.count("yes") + g.count("no"))  # of the labels
    return {"acc": acc, "precision": prec, "recall": rec, "f1": f1, "yes_ratio": yes_ratio}


def otter_reference(text):
    """Otter's parse_pred_ans (lmms_eval/tasks/mme/utils.py), written out here."""
    s = text.lower().strip().replace(".", "")
    if s == "yes" or s == "no":
        return s
    if len(s) == 1:
        return "yes" if s == "y" else "no" if s == "n" else "other"
    return "yes" if "yes" in s[:4] else "no" if "no" in s[:4] else "other"


def test_pope_lmms_eval_scoring_equals_the_reference_rules():
    from asvr.eval.scoring import parse_pope_lmms, pope_metrics_lmms

    preds, labels = TRICKY * 2, ["yes"] * 26 + ["no"] * 26
    m = pope_metrics_lmms([parse_pope_lmms(p) for p in preds], labels)
    ref = lmms_pope_reference(preds, labels)
    for k, v in ref.items():
        assert m[k] == pytest.approx(v), k
    assert m["yes_ratio"] == 0.5 and m["pred_yes_ratio"] == pytest.approx(4 / 52)  # 'Yes', ' YES ' twice each
    assert m["unparsed"] == 2 * 22
    # lenient and lmms-eval read 11 of the 26 answers differently ('yes.', 'No, there is no dog.', ...)
    assert sum(_yn(parse_yes_no(p)) != _yn(parse_pope_lmms(p)) for p in TRICKY) == 11


def _yn(x):
    return x if x in ("yes", "no") else "other"


def test_mme_otter_parser_equals_the_reference_rules():
    from asvr.eval.scoring import parse_mme_otter

    assert [parse_mme_otter(p) for p in TRICKY] == [otter_reference(p) for p in TRICKY]
    assert parse_mme_otter("Nothing") == "no" and parse_mme_otter("The cat") == "other"
    # 11 of 26 read differently ('y', 'nope', 'There is no dog.', ...)
    assert sum(_yn(parse_yes_no(p)) != parse_mme_otter(p) for p in TRICKY) == 11


def _lmms_module(name):
    """lmms-eval's own utils.py of a task, loaded by path (the package's __init__ pulls torch & co)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed (optional: pip install --no-deps lmms-eval loguru)")
    if name == "mme":
        pytest.importorskip("loguru")
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / name / "utils.py"
    mod_spec = importlib.util.spec_from_file_location(f"lmms_{name}_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_pope_and_mme_equal_lmms_evals_own_functions():
    from asvr.eval.scoring import mme_metrics, parse_mme_otter, parse_pope_lmms, pope_metrics_lmms

    pope = _lmms_module("pope")
    preds, labels = TRICKY * 2, ["yes"] * 26 + ["no"] * 26
    res = [
        pope.pope_process_results({"answer": l, "question_id": i}, [p])["pope_accuracy"]
        for i, (p, l) in enumerate(zip(preds, labels))
    ]
    m = pope_metrics_lmms([parse_pope_lmms(p) for p in preds], labels)
    assert m["acc"] == pytest.approx(pope.pope_aggregate_accuracy(res))
    assert m["precision"] == pytest.approx(pope.pope_aggregate_precision(res))
    assert m["recall"] == pytest.approx(pope.pope_aggregate_recall(res))
    assert m["f1"] == pytest.approx(pope.pope_aggregate_f1_score(res))
    assert m["yes_ratio"] == pytest.approx(pope.pope_aggregate_yes_ratio(res))
    mme = _lmms_module("mme")
    assert [parse_mme_otter(p) for p in TRICKY] == [mme.parse_pred_ans(p) for p in TRICKY]
    cats = ["count"] * 26 + ["OCR"] * 26
    imgs = [f"im{i // 2}" for i in range(52)]
    docs = [{"answer": l, "question_id": im, "category": c} for l, im, c in zip(labels, imgs, cats)]
    results = [next(iter(mme.mme_process_results(d, [p]).values())) for d, p in zip(docs, preds)]
    ours = mme_metrics(cats, imgs, [parse_mme_otter(p) == l for p, l in zip(preds, labels)])
    assert ours["totals"]["all"]["score"] == pytest.approx(mme.mme_aggregate_results(results))


def test_asvr_eval_score_rescoring_saved_predictions(tmp_path, capsys):
    import json

    from asvr.eval.cli import main
    from conftest import image_bytes

    (tmp_path / "im0.jpg").write_bytes(image_bytes(0))
    labels = ["yes", "no", "yes", "no"]
    bench = tmp_path / "coco_pope_random.json"
    bench.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "im0.jpg", "text": f"Is there a cat {i}?", "label": l}) + "\n"
            for i, l in enumerate(labels)
        )
    )
    preds = tmp_path / "predictions.jsonl"
    answers = ["Yes.", "no", "yes", "There is no cat."]
    preds.write_text("".join(json.dumps({"id": str(i), "prediction": a}) + "\n" for i, a in enumerate(answers)))
    accs = {}
    for scoring in ("lmms-eval", "lenient"):
        out = tmp_path / scoring
        assert (
            main(["score", "--bench", str(bench), "--predictions", str(preds), "--scoring", scoring, "--out", str(out)])
            == 0
        )
        rep = json.loads((out / "report.json").read_text())
        b = rep["benches"][0]
        assert b["scoring"] == scoring == b["metrics"]["scoring"]
        assert f"{scoring} scoring" in (out / "report.md").read_text()
        accs[scoring] = b["metrics"]["pope"]["acc"]
        assert [json.loads(l)["prediction"] for l in (out / "predictions.jsonl").read_text().splitlines()] == answers
    assert accs == {"lmms-eval": 0.5, "lenient": 1.0}
    preds.write_text(json.dumps({"id": "0", "prediction": "yes"}) + "\n")
    assert main(["score", "--bench", str(bench), "--predictions", str(preds), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "3 bench items have no prediction" in err and len(err.strip().splitlines()) == 1
