"""POPE / MME answer parsing on odd answers (quoted, parenthesised, negated) and the metrics
around them (issue 24), each against a reference written here:

* lenient ``parse_yes_no``: the rule of ``asvr.eval.scoring``'s docstring, re-implemented
  on its own tokenisation (``re.findall`` of letters and digits), plus hand-written answers;
* lmms-eval POPE and MME (Otter's ``parse_pred_ans``): the rules of
  lmms_eval/tasks/pope/utils.py and mme/utils.py as re-implemented in
  ``test_eval_scoring.py`` (and lmms-eval's own functions there when it is installed);
* metrics: counts and ratios worked out by hand for small tables.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
from test_eval_scoring import lmms_pope_reference, otter_reference

from asvr.eval.scoring import (
    accuracy,
    grouped_accuracy,
    is_correct,
    letters_for,
    mme_metrics,
    normalize_answer,
    parse_answer,
    parse_choice,
    parse_mme_otter,
    parse_pope_lmms,
    parse_yes_no,
    pope_metrics,
    pope_metrics_lmms,
)


def lenient_reference(text: str) -> str | None:
    """The docstring's rule: the first word if it is yes/no, else 'no' if the words hold
    no/not, else 'yes' if they hold yes, else unparsed."""
    ws = re.findall(r"[a-z0-9]+", text.lower())
    if not ws:
        return None
    if ws[0] in ("yes", "no"):
        return ws[0]
    return "no" if {"no", "not"} & set(ws) else "yes" if "yes" in ws else None


# (answer, lenient, lmms-eval POPE prediction is exactly yes/no?, Otter/MME)
ODD = [
    ('"Yes"', "yes", None, "yes"),
    ("'no'", "no", None, "no"),
    ('"No."', "no", None, "no"),
    ("(yes)", "yes", None, "yes"),
    ("(No)", "no", None, "no"),
    ("[Yes]", "yes", None, "yes"),
    ("(y)", None, None, "other"),
    ("Not yes", "no", None, "no"),  # Otter: 'no' inside 'not '
    ("not sure", "no", None, "no"),
    ("Yes, not a dog", "yes", None, "yes"),
    ("No, yes", "no", None, "no"),
    ("I do not think so.", "no", None, "other"),
    ("There isn't a dog.", None, None, "other"),  # "isn't" is neither no nor not
    ("Absolutely not!", "no", None, "other"),
    ("yes", "yes", "yes", "yes"),
    ("NO", "no", "no", "no"),
    ("  no  ", "no", "no", "no"),
    ("Yes.", "yes", None, "yes"),
    ("yes/no", "yes", None, "yes"),
    ("none", None, None, "no"),
    ("No way", "no", None, "no"),
    ("Nah", None, None, "other"),
    ("Y", None, None, "yes"),
    ("n.", None, None, "no"),
    ('"y"', None, None, "other"),
    ("...", None, None, "other"),
    ("-", None, None, "other"),
]


@pytest.mark.parametrize("text, lenient, lmms, otter", ODD)
def test_odd_answers_by_hand_and_by_reference(text, lenient, lmms, otter):
    assert parse_yes_no(text) == lenient == lenient_reference(text)
    pred = parse_pope_lmms(text)
    assert pred == text.lower().strip()
    assert (pred if pred in ("yes", "no") else None) == lmms
    assert parse_mme_otter(text) == otter == otter_reference(text)


def test_generated_odd_answers_equal_the_reference_rules():
    """Every combination of a wrapper (quotes, brackets), a case and a tail (negation,
    punctuation): each parser against its reference rule."""
    heads = ["yes", "no", "not", "yes not", "no yes", "nope", "y", "n", "maybe"]
    wraps = ["{}", '"{}"', "'{}'", "({})", "[{}]", "{}.", "{}!", " {} ", "*{}*"]
    tails = ["", ", there is a cat", " not", " no.", " (not sure)"]
    seen = 0
    for h, w, t, case in itertools.product(heads, wraps, tails, (str.lower, str.upper, str.capitalize)):
        text = w.format(case(h)) + t
        assert parse_yes_no(text) == lenient_reference(text), text
        assert parse_mme_otter(text) == otter_reference(text), text
        assert parse_answer("yes_no", text) == lenient_reference(text), text
        seen += 1
    assert seen == 9 * 9 * 5 * 3


def test_pope_metrics_on_odd_answers_equal_lmms_eval_and_hand_counts():
    answers = [t for t, *_ in ODD]
    labels = ["yes" if i % 2 else "no" for i in range(len(ODD))]
    m = pope_metrics_lmms([parse_pope_lmms(a) for a in answers], labels)
    ref = lmms_pope_reference(answers, labels)
    for k, v in ref.items():
        assert m[k] == pytest.approx(v), k
    # by hand: exact yes/no only for 'yes' (i=14, label no), 'NO' (15, yes), '  no  ' (16, no)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 1, 1, 1)
    assert m["acc"] == pytest.approx(1 / 27) and m["unparsed"] == 24
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["yes_ratio"] == pytest.approx(13 / 27) and m["pred_yes_ratio"] == pytest.approx(1 / 27)
    lenient = pope_metrics([parse_yes_no(a) for a in answers], labels)
    parsed = [r[1] for r in ODD]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(parsed, labels))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(parsed, labels))  # unparsed on a yes item: a miss
    assert (lenient["tp"], lenient["fp"], lenient["tn"], lenient["fn"]) == (tp, fp, tn, fn) == (4, 3, 6, 9)
    assert lenient["acc"] == pytest.approx(10 / 27)
    assert lenient["precision"] == pytest.approx(4 / 7) and lenient["recall"] == pytest.approx(4 / 13)
    p, r = 4 / 7, 4 / 13
    assert lenient["f1"] == pytest.approx(2 * p * r / (p + r))
    assert lenient["yes_ratio"] == pytest.approx(7 / 27) and lenient["unparsed"] == 9


def test_pope_metrics_edge_cases():
    m = pope_metrics([None, "no"], ["yes", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unparsed"]) == (0, 0, 1, 1, 1)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["acc"] == 0.5 and m["n"] == 2
    e = pope_metrics([], [])
    assert e["n"] == 0 and math.isnan(e["acc"]) and math.isnan(e["yes_ratio"])
    el = pope_metrics_lmms([], [])
    assert math.isnan(el["acc"]) and el["yes_ratio"] == 0.0 and math.isnan(el["pred_yes_ratio"])
    for f in (pope_metrics, pope_metrics_lmms):
        with pytest.raises(ValueError, match="differ in length"):
            f(["yes"], [])
    m = pope_metrics_lmms(["yes", "no", "yes"], ["yes", "no", "maybe"])  # a label outside yes/no
    assert m["yes_ratio"] == pytest.approx(1 / 2) and m["acc"] == pytest.approx(2 / 3)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (1, 1, 0, 0) and m["precision"] == 1.0 and m["f1"] == 1.0


def test_mme_scores_on_odd_answers_by_hand():
    """Two images per category, two questions each (one yes, one no): Otter's parse."""
    cats = ["count"] * 4 + ["OCR"] * 4 + ["code_reasoning"] * 4 + ["mystery"] * 2
    imgs = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f", "g", "h"]
    gold = ["yes", "no"] * 7
    answers = ['"Yes"', "(No)", "Not yes", "no", "(y)", "n.", "Y", "none", "yes.", "Nah", "YES", "No way", "y", "x"]
    correct = [parse_mme_otter(a) == g for a, g in zip(answers, gold)]
    assert correct == [True, True, False, True, False, True, True, True, True, False, True, True, True, False]
    m = mme_metrics(cats, imgs, correct)
    c = m["categories"]
    assert c["count"] == {
        "n_questions": 4,
        "n_images": 2,
        "images_without_a_pair": 0,
        "acc": 0.75,
        "acc_plus": 0.5,
        "score": 125.0,
    }
    assert (c["OCR"]["acc"], c["OCR"]["acc_plus"], c["OCR"]["score"]) == (0.75, 0.5, 125.0)
    assert (c["code_reasoning"]["acc"], c["code_reasoning"]["acc_plus"]) == (0.75, 0.5)
    assert c["mystery"]["n_images"] == 2 and c["mystery"]["images_without_a_pair"] == 2
    assert (c["mystery"]["acc"], c["mystery"]["acc_plus"], c["mystery"]["score"]) == (0.5, 0.5, 100.0)
    assert m["totals"]["perception"] == {"score": 250.0, "categories": ["OCR", "count"]}
    assert m["totals"]["cognition"] == {"score": 125.0, "categories": ["code_reasoning"]}
    assert m["totals"]["all"] == {"score": 475.0, "categories": ["OCR", "code_reasoning", "count", "mystery"]}
    only = mme_metrics(["existence"] * 2, ["i", "i"], [True, True])
    assert set(only["totals"]) == {"perception", "all"} and only["totals"]["all"]["score"] == 200.0


def test_accuracy_helpers_and_kinds():
    assert accuracy([]) != accuracy([]) and accuracy([True, False, True]) == pytest.approx(2 / 3)
    assert accuracy(iter([True, True])) == 1.0
    g = grouped_accuracy(["b", None, "a", "b"], [1, 1, 0, 0])
    assert g == {"a": {"n": 1, "correct": 0, "acc": 0.0}, "b": {"n": 2, "correct": 1, "acc": 0.5}}
    assert list(g) == ["a", "b"]
    assert is_correct("short", "2", "2") and not is_correct("short", None, "none")
    assert not is_correct("yes_no", "yes", "no")
    assert parse_answer("short", "The Two!") == "2" and parse_answer("short", "the.") is None
    assert parse_answer("multiple_choice", "(B)", ["x", "y"]) == "B"
    assert parse_answer("multiple_choice", "B") is None  # no options: no letter is valid
    with pytest.raises(ValueError, match="unknown item kind 'essay'"):
        parse_answer("essay", "x")
    assert letters_for(range(26))[-1] == "Z"
    with pytest.raises(ValueError, match="27 options; at most 26"):
        letters_for(range(27))
    assert normalize_answer("1,000 Apples, an Orange") == "1000 apples orange"
    assert normalize_answer("Ten, eleven") == "10 eleven"


@pytest.mark.parametrize(
    "text, want",
    [
        ('"B"', "B"),
        ("(D).", "D"),
        (" C ", "C"),
        ("B: not A", "B"),
        ("The answer is (A)", "A"),
        ("answer: c", None),  # letters are capitals
        ("Choice D", "D"),
        ("E", None),  # a letter beyond the options
        ("Option E is wrong; red", "A"),  # no valid letter; option text 'red'
        ("not green", "B"),  # negation is not parsed: the text names option B
        ("red green", None),  # two options' texts
        ("a yellow star", "D"),
        ("yellow", None),  # part of an option's text only
    ],
)
def test_parse_choice_on_odd_answers(text, want):
    assert parse_choice(text, ["red", "green", "blue square", "a yellow star"]) == want


def test_option_text_rules_on_two_and_one_option_questions():
    """The option-text rules of the module doc on the smallest cases, by hand: the whole
    answer equal to one option names it even when another option's text lies inside it
    ("dark red" holds "red"); with two options the other one is not named; an answer that
    names no option is unparsed even when only one option has a text."""
    assert parse_choice("blue", ["red", "blue"]) == "B"
    assert parse_choice("Red.", ["red", "blue"]) == "A"
    assert parse_choice("dark red", ["red", "dark red"]) == "B"
    assert parse_choice("a dark red", ["dark red", "red"]) == "A"
    assert parse_choice("blue", ["red"]) is None
    assert parse_choice("blue", ["red", ""]) is None
    assert parse_choice("red", ["red", ""]) == "A"


def test_pope_ratios_by_hand_when_counts_tie_or_vanish():
    """precision with tp == fp (1/2, not the 0.0 of an empty denominator), f1 with precision
    == recall; an empty denominator gives 0.0 (no "yes" label: recall; no "yes" answer:
    precision), as lmms-eval's rules (``lmms_pope_reference``); the length check's whole
    message."""
    m = pope_metrics(["yes", "yes", "no"], ["yes", "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 0)
    assert m["precision"] == 0.5 and m["recall"] == 1.0 and m["f1"] == pytest.approx(2 / 3)
    m = pope_metrics(["yes", "no"], ["no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 1, 1, 0)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    m = pope_metrics(["yes", "yes", "no"], ["yes", "no", "yes"])  # precision == recall: f1 is both
    assert m["precision"] == m["recall"] == 0.5 and m["f1"] == 0.5
    cases = [
        (["yes", "yes", "no"], ["yes", "no", "no"]),
        (["yes", "no"], ["no", "no"]),  # no "yes" label
        (["no", "no"], ["yes", "no"]),  # no "yes" answer
        (["yes", "yes", "no"], ["yes", "no", "yes"]),
    ]
    for answers, labels in cases:
        m = pope_metrics_lmms(answers, labels)
        for k, v in lmms_pope_reference(answers, labels).items():
            assert m[k] == pytest.approx(v), (answers, labels, k)
    assert pope_metrics_lmms(["no", "no"], ["yes", "no"])["precision"] == 0.0
    for f in (pope_metrics, pope_metrics_lmms):
        with pytest.raises(ValueError, match=r"^parsed and labels differ in length$"):
            f(["yes"], [])
