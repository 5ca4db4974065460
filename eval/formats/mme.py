"""Bench format ``mme``: tab-separated ``image  question  answer`` lines (extra
columns are ignored; a header row naming the columns is allowed, then a
``category`` column may be given); the category is the file name.  A *folder* is
read as the MME release (``<category>/questions_answers_YN/<image>.txt``) or as a
folder of per-category files.  Scored as lmms-eval's MME (acc, acc+, score per
category and the perception / cognition totals).

Registered like a plug-in; detected (after the plug-ins) as a folder, or a
tab-separated first line that is not an MMBench header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from asvr.eval.formats.base import (
    IMAGE_SUFFIXES,
    BenchError,
    BenchFormat,
    BenchItem,
    _gold,
    _read_tsv_rows,
    _resolve_image,
    _roots,
    _where,
    register_bench_format,
    sniff,
)
from asvr.eval.formats.mmbench import has_mmbench_header
from asvr.eval.scoring import parse_mme_otter


def _detect(path: Path) -> bool:
    s = sniff(path)
    return s.folder or (not s.json_start and not has_mmbench_header(s) and "\t" in s.line)


def read_mme(path: Path, images=None) -> list[BenchItem]:
    if path.is_dir():
        return _read_mme_folder(path, images)
    category = path.stem
    roots = _roots(path, images)
    roots = [r / category for r in roots] + [r / category / "images" for r in roots] + roots
    items: list[BenchItem] = []
    cols = None
    for n, row in _read_tsv_rows(path):
        where = _where(path, n)
        if not any(f.strip() for f in row):
            continue
        if cols is None and n == 1 and {"image", "question", "answer"} <= {f.strip().lower() for f in row}:
            cols = {f.strip().lower(): i for i, f in enumerate(row)}
            continue
        c = cols or {"image": 0, "question": 1, "answer": 2}
        if len(row) <= max(c.values()):
            raise BenchError(f"{where}: expected tab-separated image, question, answer; got {len(row)} field(s)")
        cat = row[c["category"]].strip() if "category" in c else category
        ref = row[c["image"]].strip()
        gold, raw = _yes_no(row[c["answer"]], where)
        image = _resolve_image(ref, roots, where)
        items.append(
            _mme_item(f"{cat}/{ref}#{len(items)}", row[c["question"]], gold, raw, image, f"{cat}/{ref}", where, cat)
        )
    return items


def _yes_no(answer: str, where: str) -> tuple:
    """The gold yes/no of an answer cell (and its raw text); an empty one is refused."""
    gold, raw = _gold("yes_no", answer, None, where)
    if gold is None:
        raise BenchError(f"{where}: empty answer")
    return gold, raw


def _mme_item(id_: str, question: str, gold, raw, image, key: str, where: str, category: str) -> BenchItem:
    return BenchItem(
        id=id_,
        question=question.strip(),
        kind="yes_no",
        answer=gold,
        raw_answer=raw,
        image=image,
        image_key=key,
        source=where,
        category=category,
        task="mme",
    )


def _find_image(folder: Path, stem: str, where: str) -> str:
    for d in (folder, folder / "images"):
        for suf in IMAGE_SUFFIXES:
            for s in (suf, suf.upper()):
                if (d / f"{stem}{s}").is_file():
                    return str(d / f"{stem}{s}")
    raise BenchError(f"{where}: no image named {stem}.* in {folder} or {folder / 'images'}")


def _read_mme_folder(root: Path, images=None) -> list[BenchItem]:
    """The MME release (per-image question files) or a folder of per-category TSV files."""
    items: list[BenchItem] = []
    qa_dirs = sorted(root.glob("*/questions_answers_YN"))
    for qa in qa_dirs:
        cat_dir = qa.parent
        category = cat_dir.name
        for f in sorted(qa.glob("*.txt")):
            image = _find_image(cat_dir, f.stem, _where(f, 1))
            for n, row in _read_tsv_rows(f):
                where = _where(f, n)
                if not any(x.strip() for x in row):
                    continue
                if len(row) < 2:
                    raise BenchError(f"{where}: expected question<TAB>answer")
                gold, raw = _yes_no(row[1], where)
                key = f"{category}/{f.stem}"
                items.append(_mme_item(f"{key}#{n}", row[0], gold, raw, image, key, where, category))
    if not qa_dirs:
        files = sorted(p for p in root.iterdir() if p.suffix in (".txt", ".tsv") and p.is_file())
        if not files:
            raise BenchError(f"{root}: neither an MME release folder (*/questions_answers_YN) nor *.txt/*.tsv files")
        for f in files:
            items.extend(read_mme(f, images or root))
    return items


def _mme_metrics(items: Sequence[BenchItem], records: Sequence[dict], lmms: bool) -> dict:
    from asvr.eval.scoring import mme_metrics

    return {
        "mme": mme_metrics(
            [r["category"] for r in records], [it.image_key for it in items], [bool(r["correct"]) for r in records]
        )
    }


def _mme_markdown(m: dict) -> list[str]:
    from asvr.eval.report import num, pct, table

    rows = [
        [c, str(x["n_questions"]), pct(x["acc"]), pct(x["acc_plus"]), num(x["score"], 2)]
        for c, x in m["mme"]["categories"].items()
    ]
    rows += [[f"**{name}**", "", "", "", num(t["score"], 2)] for name, t in m["mme"]["totals"].items()]
    return table(["MME category", "questions", "acc %", "acc+ %", "score"], rows) + [""]


register_bench_format(
    BenchFormat(
        "mme",
        read_mme,
        detect=_detect,
        metrics=_mme_metrics,
        markdown=_mme_markdown,
        generic_tables=False,
        reads_folders=True,
        lmms_parse=parse_mme_otter,
        detect_last=True,
    )
)
