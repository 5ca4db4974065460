"""asvr.eval.scoring: answer parsing and metrics on hand-made cases."""
from __future__ import annotations

import pytest

from asvr.eval.scoring import (grouped_accuracy, mme_metrics, normalize_answer, parse_answer, parse_choice,
                               parse_yes_no, pope_metrics)


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("yes.", "yes"), ("  YES, there is a cat.", "yes"), ("No", "no"), ("no!", "no"),
    ("There is no dog in the image.", "no"), ("It is not red.", "no"), ("I think yes", "yes"),
    ("The cat", None), ("", None), ("Yes, but no", "yes"),
])
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) == want


OPTS = ["red", "green", "blue square", "a yellow star"]


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("C) blue square", "C"), ("A. red", "A"), ("D: a yellow star", "D"),
    ("The answer is C.", "C"), ("Answer: D", "D"), ("option B", "B"),
    ("green", "B"), ("Green.", "B"), ("It is a blue square.", "C"), ("yellow star", "D"),
    ("A red circle", "A"),   # 'A' is an article here; 'red' is option A's text
    ("A purple circle", None),  # an article and no option text: not a letter
    ("E", None), ("red or green", None), ("", None), ("b", None),
])
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
