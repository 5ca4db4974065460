"""The benchmark harness: read -> generate -> parse -> score -> metrics.

``run_bench`` answers every item of each benchmark file greedily
(:mod:`asvr.eval.generate`), parses the answers by item kind
(:mod:`asvr.eval.scoring`) and computes the metrics of the layout: accuracy
overall, per kind and per category for all; plus precision / recall / F1 /
yes-ratio for POPE and acc / acc+ / score per category for MME.
"""
from __future__ import annotations

import time
from typing import Sequence

from .bench_formats import BenchItem, chance_level, read_bench
from .generate import GenerationConfig, generate_answers
from .loading import LoadedModel
from .scoring import accuracy, grouped_accuracy, is_correct, mme_metrics, parse_answer, pope_metrics


def score_items(items: Sequence[BenchItem], answers: Sequence[str]) -> list[dict]:
    """One prediction record per item: gold, prediction, parsed answer, correct (None: unscored)."""
    out = []
    for it, pred in zip(items, answers, strict=True):
        parsed = parse_answer(it.kind, pred, it.options)
        out.append({"id": it.id, "source": it.source, "category": it.category, "kind": it.kind,
                    "question": it.question, "options": it.options, "answer": it.answer,
                    "raw_answer": it.raw_answer, "prediction": pred, "parsed": parsed,
                    "correct": None if it.answer is None else is_correct(it.kind, parsed, it.answer),
                    "chance": chance_level(it),
                    "image": it.image if isinstance(it.image, str) or it.image is None else it.image_key})
    return out


def mean_chance(records: Sequence[dict]) -> float | None:
    """Chance level of a set of items: the mean of theirs; None when one is unknown."""
    ch = [r["chance"] for r in records]
    return sum(ch) / len(ch) if ch and None not in ch else None


def _with_chance(groups: dict[str, dict], key: str, scored: Sequence[dict]) -> dict[str, dict]:
    for k, g in groups.items():
        g["chance"] = mean_chance([r for r in scored if r[key] == k])
    return groups


def bench_metrics(fmt: str, items: Sequence[BenchItem], records: Sequence[dict]) -> dict:
    """Accuracy overall / per kind / per category, each with its chance level (``chance``)."""
    scored = [r for r in records if r["correct"] is not None]
    correct = [r["correct"] for r in scored]
    m = {"n": len(records), "n_scored": len(scored), "acc": accuracy(correct) if scored else None,
         "chance": mean_chance(scored), "unparsed": sum(r["parsed"] is None for r in records),
         "by_kind": _with_chance(grouped_accuracy([r["kind"] for r in scored], correct), "kind", scored),
         "by_category": _with_chance(grouped_accuracy([r["category"] for r in scored], correct), "category", scored)}
    if fmt == "pope":
        m["pope"] = pope_metrics([r["parsed"] for r in records], [r["answer"] for r in records])
        m["pope_by_category"] = {}
        for cat in sorted({r["category"] for r in records}):
            sub = [r for r in records if r["category"] == cat]
            m["pope_by_category"][cat] = pope_metrics([r["parsed"] for r in sub], [r["answer"] for r in sub])
    if fmt == "mme":
        m["mme"] = mme_metrics([r["category"] for r in records], [it.image_key for it in items],
                               [bool(r["correct"]) for r in records])
    return m


def run_bench(lm: LoadedModel, files: Sequence[str], fmt: str = "auto", images: str | None = None,
              gen: GenerationConfig | None = None, max_items: int | None = None
              ) -> tuple[list[dict], list[list[dict]]]:
    """-> (one summary per file: file, format, metrics, seconds; the prediction records per file).

    Every file is read (and checked) before the first answer is generated;
    ``max_items`` keeps the first N items of each file (smoke runs)."""
    gen = gen or GenerationConfig()
    read = [(f, k, items[:max_items]) for f, (k, items) in ((f, read_bench(f, fmt, images)) for f in files)]
    summaries, predictions = [], []
    for f, kind, items in read:
        t0 = time.perf_counter()
        answers = generate_answers(lm, items, gen)
        records = score_items(items, answers)
        summaries.append({"file": str(f), "format": kind, "metrics": bench_metrics(kind, items, records),
                          "seconds": time.perf_counter() - t0})
        predictions.append(records)
    return summaries, predictions
