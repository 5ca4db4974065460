"""Bench format ``jsonl`` (generic): one JSON object per line with ``image``, ``question``,
``answer``, optional ``options``, ``id``, ``category``, ``type`` and ``chance`` (see
:mod:`asvr.eval.formats.base`); what ``asvr.demo`` writes as ``vqa_bench.jsonl``.

Registered like a plug-in; detected (after the plug-ins) by a first line that is a JSON
object and not a POPE record.
"""

from __future__ import annotations

from pathlib import Path

from asvr.eval.formats.base import (
    BenchError,
    BenchFormat,
    BenchItem,
    _chance,
    _gold,
    _json_lines,
    _options,
    _resolve_image,
    _roots,
    _text_field,
    _where,
    register_bench_format,
    sniff,
)
from asvr.eval.formats.pope import is_pope
from asvr.eval.scoring import KINDS, normalize_answer


def _detect(path: Path) -> bool:
    s = sniff(path)
    return s.json_start and not is_pope(s)


def read_jsonl(path: Path, images=None) -> list[BenchItem]:
    roots = _roots(path, images)
    items = []
    for n, rec in _json_lines(path):
        where = _where(path, n)
        question = _text_field(rec, ("question", "text", "prompt"), where)
        options = _options(rec.get("options"), where)
        answer = rec.get("answer")
        kind = rec.get("type") or rec.get("kind")
        if kind not in KINDS:
            kind = (
                "multiple_choice"
                if options
                else "yes_no"
                if isinstance(answer, str) and normalize_answer(answer) in ("yes", "no")
                else "short"
            )
        if kind == "multiple_choice" and not options:
            raise BenchError(f"{where}: multiple-choice item without options")
        gold, raw = _gold(kind, answer, options, where)
        ref = _text_field(rec, ("image",), where, required=False)
        image = _resolve_image(ref, roots, where) if ref else None
        items.append(
            BenchItem(
                id=str(rec.get("id", rec.get("question_id", f"{path.name}:{n}"))),
                question=question,
                kind=kind,
                answer=gold,
                raw_answer=raw,
                image=image,
                image_key=image,
                source=where,
                options=options,
                hint=_text_field(rec, ("hint",), where, required=False),
                category=_text_field(rec, ("category",), where, required=False),
                chance=_chance(rec.get("chance"), where),
            )
        )
    return items


register_bench_format(BenchFormat("jsonl", read_jsonl, detect=_detect, detect_last=True))
