"""Answer parsing and benchmark metrics (pure functions, no model).

Generated answers are free text; each item kind has one parser:

* ``yes_no``: the first word if it is yes/no, else "no" if the words hold
  "no"/"not", else "yes" if they hold "yes", else *unparsed* (None).  LLaVA's
  POPE script maps everything that is not "no" to "yes"; we keep unparsed
  answers apart and count them wrong, so a model that babbles does not score
  50% on a balanced yes/no set (the report gives the unparsed count).
* ``multiple_choice``: a leading option letter (``B``, ``B.``, ``(B)``, ``"B"``,
  ``B)``, ``B:``), "answer is B" / "option B", else the option *text*
  (the whole answer equal to one option, or exactly one option's words inside
  it).  A bare ``A`` followed by a word (``A red circle``) is read as an
  article, not a letter, unless that is also an option's text.
* ``short``: normalised exact match (lower case, punctuation and articles
  dropped, number words 0-10 as digits), as the VQA normalisation does.

Metrics: accuracy per kind / category; POPE accuracy, precision, recall, F1
and yes-ratio (positive = "yes"); MME acc (per question) and acc+ (per image:
both of its questions right) per category, score = 100 * (acc + acc+).

POPE and MME are also scored as lmms-eval scores them (``--scoring
lmms-eval``, the default for those two layouts, so numbers compare with
published ones; lmms_eval/tasks/pope/utils.py and mme/utils.py):

* POPE (:func:`pope_metrics_lmms`): the prediction is the whole answer
  lower-cased and stripped; right only when it *equals* the label ("Yes."
  is wrong).  Recall counts as false negatives only the answers that are
  exactly "no" (other text on a "yes" item lowers accuracy, not recall), and
  lmms-eval's yes-ratio is the share of "yes" *labels* (0.5 on the balanced
  POPE files), not of answers; the answers' share is ``pred_yes_ratio``.
* MME (:func:`parse_mme_otter`): Otter's ``parse_pred_ans``: lower-case,
  strip, drop every "."; "yes"/"no" as is; one letter "y"/"n"; else "yes"
  if the first four characters hold "yes", else "no" if they hold "no",
  else "other" (wrong).  acc / acc+ per category as above.

Of 26 tricky answers (tests/test_eval_scoring.py: "yes.", "y", "nope",
"There is no dog.", ...) lenient and lmms-eval read 11 differently for POPE
and 11 for MME.  MMBench and ScienceQA multiple choice as lmms-eval:
:mod:`asvr.eval.lmms_rules` (of 23 tricky answers, 3 and 11 read differently
from the lenient parser below).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Iterable, Sequence

KINDS = ("yes_no", "multiple_choice", "short")
SCORINGS = ("lmms-eval", "lenient")
"""How POPE and MME answers are parsed and counted (see module doc); other layouts are always lenient."""
LETTERS = string.ascii_uppercase
NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def words(s: str) -> list[str]:
    """Lower case, punctuation as spaces, number words as digits (articles kept)."""
    s = re.sub(r"(?<=\d),(?=\d)", "", s.lower())  # 1,000 -> 1000
    s = re.sub(rf"[{re.escape(string.punctuation)}]", " ", s)
    return [NUMBER_WORDS.get(w, w) for w in s.split()]


def normalize_answer(s: str) -> str:
    """The comparison form of a short answer: :func:`words` without articles."""
    return " ".join(w for w in words(s) if w not in ARTICLES)


def parse_yes_no(text: str) -> str | None:
    """'yes' / 'no' / None (see module doc)."""
    ws = words(text)
    if not ws:
        return None
    if ws[0] in ("yes", "no"):
        return ws[0]
    if "no" in ws or "not" in ws:
        return "no"
    if "yes" in ws:
        return "yes"
    return None


def parse_pope_lmms(text: str) -> str:
    """lmms-eval's POPE prediction: the whole answer, lower-cased and stripped."""
    return text.lower().strip()


def parse_mme_otter(text: str) -> str:
    """Otter's ``parse_pred_ans`` (lmms-eval MME): 'yes' / 'no' / 'other'."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


_LEAD_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])\s*[.):](?!\w))")
_ONLY_LETTER = re.compile(r"^\s*[\"'(]?([A-Z])[\"')]?\s*[.!]?\s*$")  # B, (B), "B", 'B.'
_SAID_LETTER = re.compile(r"\b(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b\)?")


def letters_for(options: Sequence[object]) -> list[str]:
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options; at most {len(LETTERS)}")
    return list(LETTERS[: len(options)])


def parse_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter an answer names (see module doc), or None."""
    valid = letters_for(options)
    for rx in (_ONLY_LETTER, _LEAD_LETTER, _SAID_LETTER):
        m = rx.search(text)
        if m:
            letter = next(g for g in m.groups() if g)
            if letter in valid:
                return letter
    norm = normalize_answer(text)
    texts = [normalize_answer(o) for o in options]
    exact = [c for c, t in zip(valid, texts) if t and t == norm]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm} "
    inside = [c for c, t in zip(valid, texts) if t and f" {t} " in padded]
    if len(inside) == 1:
        return inside[0]
    return None


def parse_answer(kind: str, text: str, options: Sequence[str] | None = None) -> str | None:
    """Free text -> the comparable answer of ``kind`` (None: unparsed)."""
    if kind == "yes_no":
        return parse_yes_no(text)
    if kind == "multiple_choice":
        return parse_choice(text, options or [])
    if kind == "short":
        return normalize_answer(text) or None
    raise ValueError(f"unknown item kind {kind!r}; one of {KINDS}")


def is_correct(kind: str, parsed: str | None, gold: str) -> bool:
    """``gold`` is already canonical (yes/no, a letter, or a normalised short answer)."""
    return parsed is not None and parsed == gold


# --------------------------------------------------------------------------- aggregates
def accuracy(correct: Iterable[bool]) -> float:
    c = list(correct)
    return sum(c) / len(c) if c else float("nan")


def grouped_accuracy(keys: Sequence[str | None], correct: Sequence[bool]) -> dict[str, dict]:
    """``{key: {"n", "correct", "acc"}}`` (None keys skipped), sorted by key."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, c in zip(keys, correct):
        if k is not None:
            groups[k].append(bool(c))
    return {k: {"n": len(v), "correct": sum(v), "acc": accuracy(v)} for k, v in sorted(groups.items())}


def pope_metrics(parsed: Sequence[str | None], labels: Sequence[str]) -> dict:
    """POPE: positive = 'yes'.  Unparsed answers are wrong and count as not-'yes'."""
    if len(parsed) != len(labels):
        raise ValueError("parsed and labels differ in length")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, labels))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(parsed, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(parsed, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "acc": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in parsed) / n if n else float("nan"),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": sum(p is None for p in parsed),
    }


def pope_metrics_lmms(parsed: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE as lmms-eval (see module doc): same keys as :func:`pope_metrics`, plus ``pred_yes_ratio``."""
    if len(parsed) != len(labels):
        raise ValueError("parsed and labels differ in length")
    pairs = list(zip(parsed, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n_yes_no = sum(l in ("yes", "no") for l in labels)
    return {
        "n": n,
        "acc": sum(p == l for p, l in pairs) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(l == "yes" for l in labels) / n_yes_no if n_yes_no else 0.0,
        "pred_yes_ratio": sum(p == "yes" for p in parsed) / n if n else float("nan"),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": sum(p not in ("yes", "no") for p in parsed),
    }


def mme_metrics(categories: Sequence[str], images: Sequence[str | None], correct: Sequence[bool]) -> dict:
    """MME per category: acc (questions), acc+ (images whose questions are all
    right; MME has two per image), score = 100 * (acc + acc+); totals for the
    perception and cognition categories present."""
    per_q: dict[str, list[bool]] = defaultdict(list)
    per_img: dict[str, dict[str | None, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for cat, img, c in zip(categories, images, correct):
        per_q[cat].append(bool(c))
        per_img[cat][img].append(bool(c))
    cats = {}
    for cat in sorted(per_q):
        imgs = per_img[cat]
        acc = accuracy(per_q[cat])
        acc_plus = accuracy(all(v) for v in imgs.values())
        cats[cat] = {
            "n_questions": len(per_q[cat]),
            "n_images": len(imgs),
            "images_without_a_pair": sum(len(v) != 2 for v in imgs.values()),
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100 * (acc + acc_plus),
        }
    totals = {}
    for name, members in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in cats if c.lower() in {m.lower() for m in members}]
        if present:
            totals[name] = {"score": sum(cats[c]["score"] for c in present), "categories": present}
    totals["all"] = {"score": sum(v["score"] for v in cats.values()), "categories": list(cats)}
    return {"categories": cats, "totals": totals}
