"""Bench format ``pope``: JSON lines ``{question_id, image, text, label: yes|no}``
(``coco_pope_{random,popular,adversarial}.json``); the category is the record's
``category`` or else the file name.  Scored as lmms-eval's POPE, with POPE's own
metrics (accuracy, precision, recall, F1, yes ratio) per category.

Registered like a plug-in; detected (after the plug-ins) by a first record with
``label``, ``text`` and ``question_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from asvr.eval.formats.base import (
    BenchError,
    BenchFormat,
    BenchItem,
    Sniff,
    _gold,
    _json_lines,
    _resolve_image,
    _roots,
    _where,
    register_bench_format,
    sniff,
)
from asvr.eval.scoring import parse_pope_lmms

POPE_FIELDS = {"label", "text", "question_id"}


def is_pope(s: Sniff) -> bool:
    rec = s.record if s.json_start else None
    return isinstance(rec, dict) and POPE_FIELDS <= set(rec)


def read_pope(path: Path, images=None) -> list[BenchItem]:
    roots = _roots(path, images)
    items = []
    for n, rec in _json_lines(path):
        where = _where(path, n)
        for k in ("question_id", "image", "text", "label"):
            if k not in rec:
                raise BenchError(f"{where}: POPE record without {k!r}")
        gold, raw = _gold("yes_no", rec["label"], None, where)
        if gold is None:
            raise BenchError(f"{where}: empty POPE label")
        image = _resolve_image(str(rec["image"]), roots, where)
        items.append(
            BenchItem(
                id=str(rec["question_id"]),
                question=str(rec["text"]),
                kind="yes_no",
                answer=gold,
                raw_answer=raw,
                image=image,
                image_key=image,
                source=where,
                category=str(rec.get("category") or path.stem),
                task="pope",
            )
        )
    return items


def _pope_metrics(items: Sequence[BenchItem], records: Sequence[dict], lmms: bool) -> dict:
    from asvr.eval.scoring import pope_metrics as lenient
    from asvr.eval.scoring import pope_metrics_lmms

    pope_metrics = pope_metrics_lmms if lmms else lenient
    by_cat = {}
    for cat in sorted({r["category"] for r in records}):
        sub = [r for r in records if r["category"] == cat]
        by_cat[cat] = pope_metrics([r["parsed"] for r in sub], [r["answer"] for r in sub])
    return {
        "pope": pope_metrics([r["parsed"] for r in records], [r["answer"] for r in records]),
        "pope_by_category": by_cat,
    }


def _pope_markdown(m: dict) -> list[str]:
    from asvr.eval.report import pct, table

    rows = [
        [cat, str(p["n"]), pct(p["acc"]), pct(p["precision"]), pct(p["recall"]), pct(p["f1"]), pct(p["yes_ratio"])]
        for cat, p in [*m["pope_by_category"].items(), ("all", m["pope"])]
    ]
    return table(["POPE", "n", "acc %", "precision %", "recall %", "F1 %", "yes %"], rows) + [""]


register_bench_format(
    BenchFormat(
        "pope",
        read_pope,
        detect=lambda path: is_pope(sniff(path)),
        metrics=_pope_metrics,
        markdown=_pope_markdown,
        generic_tables=False,
        lmms_parse=parse_pope_lmms,
        detect_last=True,
    )
)
