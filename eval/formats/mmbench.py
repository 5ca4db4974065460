"""Bench format ``mmbench``: the MMBench TSV of VLMEvalKit: a header with ``index,
question, hint, A, B, C, D[, E..], answer, image, category``; ``image`` is base64 (what
the release files carry), a path, or the index of an earlier row with the same
image; an empty answer leaves the item unscored (test splits).  Scored as
lmms-eval's MMBench, with its circular accuracy.

Registered like a plug-in; detected (after the plug-ins) by that header, unless the
file name says ScienceQA (:mod:`asvr.eval.formats.scienceqa`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from typing import Sequence

from asvr.eval.formats.base import (
    IMAGE_SUFFIXES,
    BenchError,
    BenchFormat,
    BenchItem,
    Sniff,
    _gold,
    _read_tsv_rows,
    _resolve_image,
    _roots,
    _where,
    register_bench_format,
    sniff,
)
from asvr.eval.scoring import letters_for

MMBENCH_COLUMNS = {"question", "A", "B", "answer"}


def has_mmbench_header(s: Sniff) -> bool:
    return not s.folder and not s.json_start and MMBENCH_COLUMNS <= s.columns


def is_scienceqa_name(path: Path) -> bool:
    name = path.name.lower()
    return "scienceqa" in name or name.startswith("sqa")


def _tsv_image(value: str, roots: Sequence[Path], where: str) -> bytes | str | None:
    v = value.strip()
    if not v or v == "nan":
        return None
    if len(v) < 1024 and Path(v).suffix.lower() in IMAGE_SUFFIXES:
        return _resolve_image(v, roots, where)
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise BenchError(f"{where}: image is neither base64 nor an image path") from None


def _read_header(row: list[str], where: str) -> list[str]:
    header = [h.strip() for h in row]
    missing = [k for k in ("question", "A", "B", "answer") if k not in header]
    if missing:
        raise BenchError(f"{where}: MMBench header lacks column(s) {missing} (has {header[:12]})")
    return header


def _options(rec: dict[str, str], where: str) -> list[str]:
    """The option texts A, B[, C, ...] (no gaps, at least two)."""
    present = [c for c in letters_for(range(26)) if c in rec and rec[c].strip() not in ("", "nan")]
    if present != letters_for(present) or len(present) < 2:
        raise BenchError(f"{where}: options must be A, B[, C, ...] without gaps; got {present}")
    return [rec[c].strip() for c in present]


def _row_image(
    rec: dict[str, str], index: str, by_index: dict[str, bytes | str | None], roots: Sequence[Path], where: str
) -> bytes | str | None:
    """The row's image: its own cell, an earlier row's by index, or (none) its circular original's;
    recorded in ``by_index`` for the rows after it."""
    # MMBench stores an image once per question index; circular copies reuse it by index % 1e6
    ref = rec.get("image", "").strip()
    if ref.isdigit() and len(ref) < 16:  # VLMEvalKit: a repeated image holds the index of its first row
        if ref not in by_index:
            raise BenchError(f"{where}: image refers to index {ref}, which has no image above")
        image = by_index[ref]
    else:
        image = _tsv_image(ref, roots, where)
    if image is None and index.isdigit():
        image = by_index.get(str(int(index) % 1_000_000))
    if image is not None:
        by_index.setdefault(index, image)
        if index.isdigit():
            by_index.setdefault(str(int(index) % 1_000_000), image)
    return image


def _item(rec: dict[str, str], n: int, by_index: dict, roots: Sequence[Path], where: str, task: str) -> BenchItem:
    options = _options(rec, where)
    gold, raw = _gold("multiple_choice", rec["answer"], options, where)
    index = rec.get("index", str(n)).strip()
    image = _row_image(rec, index, by_index, roots, where)
    hint = rec.get("hint", "").strip()
    key = image if image is None or isinstance(image, str) else "sha256:" + hashlib.sha256(image).hexdigest()
    return BenchItem(
        id=index,
        question=rec["question"].strip(),
        kind="multiple_choice",
        answer=gold,
        raw_answer=raw,
        image=image,
        image_key=key,
        source=where,
        options=options,
        hint=hint if hint and hint != "nan" else None,
        category=(rec.get("category") or "").strip() or None,
        task=task,
    )


def read_mmbench(path: Path, images=None, task: str = "mmbench") -> list[BenchItem]:
    roots = _roots(path, images)
    items: list[BenchItem] = []
    header: list[str] | None = None
    by_index: dict[str, bytes | str | None] = {}
    for n, row in _read_tsv_rows(path):
        where = _where(path, n)
        if header is None:
            header = _read_header(row, where)
            continue
        if not any(x.strip() for x in row):
            continue
        if len(row) != len(header):
            raise BenchError(f"{where}: {len(row)} fields, the header has {len(header)}")
        items.append(_item(dict(zip(header, row)), n, by_index, roots, where, task))
    if header is None:
        raise BenchError(f"{path}: empty file")
    return items


def _mmbench_metrics(items: Sequence[BenchItem], records: Sequence[dict], lmms: bool) -> dict:
    from asvr.eval.lmms_rules import circular_accuracy

    scored = [r for r in records if r["correct"] is not None]
    acc, n = circular_accuracy([r["id"] for r in scored], [bool(r["correct"]) for r in scored])
    return {"circular_acc": acc, "circular_questions": n}


def _mmbench_markdown(m: dict) -> list[str]:
    from asvr.eval.report import pct

    if m.get("circular_acc") is None:
        return []
    return [
        f"MMBench circular accuracy (every rotated copy right, lmms-eval's number): "
        f"{pct(m['circular_acc'])}% of {m['circular_questions']} questions",
        "",
    ]


def _lmms_choice(task: str):
    from asvr.eval.lmms_rules import CHOICES

    return CHOICES[task]


register_bench_format(
    BenchFormat(
        "mmbench",
        read_mmbench,
        detect=lambda path: has_mmbench_header(sniff(path)) and not is_scienceqa_name(path),
        metrics=_mmbench_metrics,
        markdown=_mmbench_markdown,
        lmms_choice=_lmms_choice("mmbench"),
        detect_last=True,
    )
)
