"""lmms-eval's prompt construction and multiple-choice scoring for the task formats read here.

Written from lmms-eval's task code (``lmms_eval/tasks/pope/utils.py``,
``mme/utils.py`` + ``mme.yaml``, ``mmbench/en_utils.py`` + ``mmbench_evals.py``
+ ``_default_template_mmbench_en_yaml``, ``scienceqa/utils.py`` +
``scienceqa_img.yaml``; the ``default`` model kwargs), so that
``asvr-eval bench`` asks and scores as ``lmms-eval --tasks pope,mme,mmbench_en_dev,scienceqa_img``
does.  POPE/MME answer parsing lives in :mod:`asvr.eval.scoring` (``parse_pope_lmms``,
``parse_mme_otter``).

Prompts (the user text after the image):

* POPE: ``question.strip()`` + ``"\\nAnswer the question using a single word or phrase."``
* MME: the same, after removing ``" Please answer yes or no."`` from the question
  (MME's release questions all end with it; LLaVA's own MME script keeps it).
* MMBench: ``"{hint} {question} {options}"`` (no hint: ``"{question} {options}"``) where
  options is ``"There are several options:\\nA. ...\\nB. ..."``, then ``"\\n"`` +
  ``"\\nAnswer with the option's letter from the given choices directly."`` (an empty line
  before the instruction: lmms-eval joins with a newline a post-prompt that starts with one).
* ScienceQA: ``"Context: {hint}\\n"`` (when there is a hint) + question + ``"\\nA. ...\\nB. ..."``
  + ``"\\nAnswer with the option's letter from the given choices directly."``

Multiple-choice scoring:

* MMBench (:func:`mmbench_choice`): ``MMBench_Evaluator.can_infer``: the option letter
  when exactly one of A-E stands alone among the answer's words (a leading ``A`` in an
  answer of more than 3 words is an article, not a letter), else exactly one letter in one
  of the forms ``A.`` ``A,`` ``A:`` ``A)`` ``A).`` ``(A)`` ``(A).`` ``:A`` ``:A,`` ``:A.``
  ``:A)`` ``:A).``, else the one option (A-D) whose text is inside the lower-cased answer.
  When that fails lmms-eval asks GPT (``mmbench_en_dev``) or a regex extractor
  (``..._static``); here the answer is unparsed and wrong (counted in ``unparsed``).
  lmms-eval's MMBench accuracy is *circular*: a question is right only when every
  rotated copy (index + k * 10**6) is right; the report gives it as ``circular_acc``.
* ScienceQA (:func:`scienceqa_choice`): ``sqa_process_results``: right when the stripped
  answer equals the letter (any case), or starts with an upper-case letter followed by
  ``.`` and that letter is the answer; nothing else.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from asvr.eval.formats.base import BenchItem

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
MME_REMOVED = " Please answer yes or no."
MMBENCH_OPTIONS = "There are several options:"


def pope_prompt(item: BenchItem) -> str:
    return item.question.strip() + SHORT


def mme_prompt(item: BenchItem) -> str:
    return item.question.strip().replace(MME_REMOVED, "") + SHORT


def mmbench_prompt(item: BenchItem) -> str:
    opts = MMBENCH_OPTIONS + "\n" + "".join(f"{c}. {o}\n" for c, o in zip(string.ascii_uppercase, item.options or []))
    opts = opts.rstrip("\n")
    query = f"{item.hint} {item.question} {opts}" if item.hint else f"{item.question} {opts}"
    return f"{query}\n{LETTER}"


def scienceqa_prompt(item: BenchItem) -> str:
    context = f"Context: {item.hint}\n" if item.hint else ""
    choices = "\n".join(f"{c}. {o}" for c, o in zip(string.ascii_uppercase, item.options or []))
    return f"{context}{item.question}\n{choices}{LETTER}"


PROMPTS: dict[str, Callable[["BenchItem"], str]] = {
    "pope": pope_prompt,
    "mme": mme_prompt,
    "mmbench": mmbench_prompt,
    "scienceqa": scienceqa_prompt,
}
"""lmms-eval task -> the user text of an item (``BenchItem.task``)."""


# --------------------------------------------------------------------------- multiple choice
_TUPS = [
    ("", "."),
    ("", ","),
    ("", ":"),
    ("", ")"),
    ("", ")."),
    ("(", ")"),
    ("(", ")."),
    (":", ""),
    (":", ","),
    (":", "."),
    (":", ")"),
    (":", ")."),
]


def _infer_option(answer: str, letters: str = "ABCDE") -> str | None:
    words = [w.strip() for w in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in words for c in letters)

    if count() == 1:
        if not ("A" in words and len(words) > 3):  # "A" in a sentence: an article
            for c in letters:
                if c in words:
                    return c
    for pre, suf in _TUPS:
        if count(pre, suf) == 1:
            for c in letters:
                if pre + c + suf in words:
                    return c
    return None


def _infer_text(answer: str, options: Sequence[str]) -> str | None:
    low = answer.lower()
    hits = [c for c, o in zip("ABCD", options) if str(o).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_choice(answer: str, options: Sequence[str]) -> str | None:
    """lmms-eval's MMBench ``can_infer`` (see module doc); None where lmms-eval would ask GPT."""
    return _infer_option(answer) or _infer_text(answer, options)


def scienceqa_choice(answer: str, options: Sequence[str]) -> str | None:
    """The letter lmms-eval's ScienceQA scoring credits the answer with, or None (see module doc)."""
    pred = answer.strip()
    if len(pred) == 1 and pred.isalpha():
        return pred.upper()
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0]
    return None


CHOICES: dict[str, Callable[[str, Sequence[str]], str | None]] = {
    "mmbench": mmbench_choice,
    "scienceqa": scienceqa_choice,
}


def circular_accuracy(ids: Sequence[str], correct: Sequence[bool]) -> tuple[float | None, int]:
    """MMBench's circular accuracy: questions ``i < 10**6`` right only when every copy with
    ``index % 10**6 == i`` is right.  -> (accuracy or None without numeric ids, questions)."""
    groups: dict[int, list[bool]] = {}
    for i, c in zip(ids, correct):
        if not str(i).isdigit():
            return None, 0
        groups.setdefault(int(i) % 1_000_000, []).append(bool(c))
    if not groups:
        return None, 0
    return sum(all(v) for v in groups.values()) / len(groups), len(groups)


__all__ = ["PROMPTS", "CHOICES", "mmbench_choice", "scienceqa_choice", "circular_accuracy"]
