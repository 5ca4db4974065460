"""The benchmark harness: read -> generate -> parse -> score -> metrics.

``run_bench`` answers every item of each benchmark file greedily
(:mod:`asvr.eval.generate`), parses the answers by item kind
(:mod:`asvr.eval.scoring`) and computes the metrics of the layout: accuracy
overall, per kind and per category for all; plus precision / recall / F1 /
yes-ratio for POPE, acc / acc+ / score per category for MME, and MMBench's
circular accuracy.  POPE, MME, MMBench and ScienceQA are scored as lmms-eval by
default (``scoring``; :mod:`asvr.eval.scoring`, :mod:`asvr.eval.lmms_rules`);
each summary records the scoring used.  :func:`rescore` scores saved
prediction records again without a model (``asvr-eval score``).  Each
layout's own parser and metrics come from its
:class:`~asvr.eval.formats.base.BenchFormat`; nothing here branches on names.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from asvr.eval.formats.base import BenchItem, bench_format, chance_level, read_bench
from asvr.eval.generate import GenerationConfig, generate_answers
from asvr.eval.loading import EvalError, LoadedModel
from asvr.eval.scoring import SCORINGS, accuracy, grouped_accuracy, is_correct, parse_answer


def scoring_for(fmt: str, scoring: str) -> str:
    """The scoring a layout gets: lmms-eval exists for POPE, MME, MMBench and ScienceQA."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return scoring if bench_format(fmt).lmms_scored else "lenient"


def _parse(fmt: str, scoring: str, it: BenchItem, pred: str) -> str | None:
    layout = bench_format(fmt)
    if scoring_for(fmt, scoring) == "lmms-eval":
        if layout.lmms_parse is not None:
            return layout.lmms_parse(pred)
        if layout.lmms_choice is not None and it.kind == "multiple_choice":
            return layout.lmms_choice(pred, it.options or [])
    return parse_answer(it.kind, pred, it.options)


def score_items(
    items: Sequence[BenchItem], answers: Sequence[str], fmt: str = "jsonl", scoring: str = "lmms-eval"
) -> list[dict]:
    """One prediction record per item: gold, prediction, parsed answer, correct (None: unscored)."""
    out = []
    for it, pred in zip(items, answers, strict=True):
        parsed = _parse(fmt, scoring, it, pred)
        out.append(
            {
                "id": it.id,
                "source": it.source,
                "category": it.category,
                "kind": it.kind,
                "question": it.question,
                "options": it.options,
                "answer": it.answer,
                "raw_answer": it.raw_answer,
                "prediction": pred,
                "parsed": parsed,
                "correct": None if it.answer is None else is_correct(it.kind, parsed, it.answer),
                "chance": chance_level(it),
                "image": it.image if isinstance(it.image, str) or it.image is None else it.image_key,
            }
        )
    return out


def mean_chance(records: Sequence[dict]) -> float | None:
    """Chance level of a set of items: the mean of theirs; None when one is unknown."""
    ch = [r["chance"] for r in records]
    return sum(ch) / len(ch) if ch and None not in ch else None


def _with_chance(groups: dict[str, dict], key: str, scored: Sequence[dict]) -> dict[str, dict]:
    for k, g in groups.items():
        g["chance"] = mean_chance([r for r in scored if r[key] == k])
    return groups


def bench_metrics(fmt: str, items: Sequence[BenchItem], records: Sequence[dict], scoring: str = "lmms-eval") -> dict:
    """Accuracy overall / per kind / per category, each with its chance level (``chance``)."""
    scored = [r for r in records if r["correct"] is not None]
    correct = [r["correct"] for r in scored]
    lmms = scoring_for(fmt, scoring) == "lmms-eval"
    m = {
        "n": len(records),
        "n_scored": len(scored),
        "acc": accuracy(correct) if scored else None,
        "chance": mean_chance(scored),
        "scoring": scoring_for(fmt, scoring),
        "unparsed": sum(
            r["parsed"] not in ("yes", "no") if lmms and r["kind"] == "yes_no" else r["parsed"] is None for r in records
        ),
        "by_kind": _with_chance(grouped_accuracy([r["kind"] for r in scored], correct), "kind", scored),
        "by_category": _with_chance(grouped_accuracy([r["category"] for r in scored], correct), "category", scored),
    }
    layout = bench_format(fmt)
    if layout.metrics is not None:
        m.update(layout.metrics(items, records, lmms))
    return m


def rescore(fmt: str, items: Sequence[BenchItem], records: Sequence[dict], scoring: str) -> tuple[list[dict], dict]:
    """Saved prediction records (``predictions.jsonl``) of the bench ``items`` -> (fresh records, metrics).

    Records are matched to items by ``id``; every item needs one."""
    by_id = {str(r.get("id")): r for r in records}
    missing = [it.id for it in items if it.id not in by_id]
    if missing:
        raise EvalError(f"{len(missing)} bench items have no prediction (first: {missing[0]!r})")
    answers = [str(by_id[it.id].get("prediction", "")) for it in items]
    fresh = score_items(items, answers, fmt, scoring)
    return fresh, bench_metrics(fmt, items, fresh, scoring)


def run_bench(
    lm: LoadedModel | None,
    files: Sequence[str],
    fmt: str = "auto",
    images: str | None = None,
    gen: GenerationConfig | None = None,
    max_items: int | None = None,
    scoring: str = "lmms-eval",
    answer: Callable[[Sequence[BenchItem], GenerationConfig], list[str]] | None = None,
) -> tuple[list[dict], list[list[dict]]]:
    """-> (one summary per file: file, format, metrics, seconds; the prediction records per file).

    Every file is read (and checked) before the first answer is generated;
    ``max_items`` keeps the first N items of each file (smoke runs).  ``answer``
    replaces ASVR generation (a Hugging Face LLaVA folder: ``hf_llava.HFLlavaModel.answer``)."""
    gen = gen or GenerationConfig()
    if answer is None:
        if lm is None:
            raise ValueError("run_bench needs a model or answer=")
        model = lm
        answer = lambda items, g: generate_answers(model, items, g)  # noqa: E731
    read = [(f, k, items[:max_items]) for f, (k, items) in ((f, read_bench(f, fmt, images)) for f in files)]
    summaries, predictions = [], []
    for f, kind, items in read:
        t0 = time.perf_counter()
        answers = answer(items, gen)
        records = score_items(items, answers, kind, scoring)
        summaries.append(
            {
                "file": str(f),
                "format": kind,
                "scoring": scoring_for(kind, scoring),
                "metrics": bench_metrics(kind, items, records, scoring),
                "seconds": time.perf_counter() - t0,
            }
        )
        predictions.append(records)
    return summaries, predictions
