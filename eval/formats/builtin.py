"""Benchmark readers: local files in common VQA layouts -> :class:`BenchItem` lists.

Layouts (``--format auto`` picks by content):

* ``jsonl`` (generic): one JSON object per line with ``image`` (path; may be
  absent for a text-only question), ``question``, ``answer``, optional
  ``options`` (a list, or a ``{"A": ..}`` dict: multiple choice; the answer is
  a letter or an option's text), optional ``id``, ``category`` and ``type``
  (``yes_no`` | ``multiple_choice`` | ``short``; inferred when absent: options
  -> multiple choice, a yes/no answer -> yes/no, else short) and ``chance``
  (the item's chance level, a probability; see :func:`chance_level`).  What
  ``asvr.demo.sample_corpus`` and ``asvr.demo.vqa_corpus`` write as
  ``vqa_bench.jsonl``.
* ``pope``: JSON lines ``{question_id, image, text, label: yes|no}``
  (``coco_pope_{random,popular,adversarial}.json``); the category is the
  record's ``category`` or else the file name.
* ``mme``: tab-separated ``image  question  answer`` lines (extra columns, such
  as the prediction column of MME's ``eval_tool`` result files, are ignored;
  a header row naming the columns is allowed, then a ``category`` column may
  be given); the category is the file name.  A *folder* is read as the MME
  release (``<category>/questions_answers_YN/<image>.txt`` holding the two
  question/answer lines of each image) or as a folder of per-category files.
* ``mmbench``: the MMBench / ScienceQA TSV of VLMEvalKit: a header with
  ``index, question, hint, A, B, C, D[, E..], answer, image, category``;
  ``image`` is base64 (what the release files carry) or a path; an empty
  answer leaves the item unscored (test splits).
* ``scienceqa``: the same TSV, asked and scored as lmms-eval's ScienceQA
  (auto-detected when the file name holds ``scienceqa`` or starts with ``sqa``).

Each item records its lmms-eval task (``BenchItem.task``: pope, mme, mmbench,
scienceqa; None for the generic JSONL), whose prompt and scoring it gets by
default (:mod:`asvr.eval.lmms_rules`).

Relative image paths resolve against ``--images`` and then the bench file's
folder.  Every problem raises :class:`BenchError` whose one-line message
names the file and line.

The layouts are a registry of :class:`BenchFormat` (reader, detection, the
layout's own metrics and report tables).  Adding one is one module
``asvr/eval/format_<name>.py`` (and its test) that calls
:func:`register_bench_format`; ``format_*`` modules are imported by
:func:`bench_formats`, so ``--format``, auto-detection, ``asvr-eval bench``'s
metrics and ``report.md`` all see it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence, overload

from asvr.core.llava_json import lone_surrogate
from asvr.core.paths import UnsafePathError, confine
from asvr.core.registry import Registry

from asvr.eval.scoring import KINDS, letters_for, normalize_answer, parse_choice, parse_mme_otter, parse_pope_lmms
from asvr.core.errors import AsvrError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BenchError(AsvrError):
    """A bad benchmark file; the message names the file and line."""


@dataclass
class BenchItem:
    id: str
    question: str
    kind: str
    """yes_no | multiple_choice | short."""
    answer: str | None
    """Canonical gold answer: 'yes'/'no', an option letter, or a normalised short answer; None = unscored."""
    raw_answer: str | None
    image: str | bytes | None
    """A resolved image path, raw image bytes (base64 TSV) or None (text-only question)."""
    image_key: str | None
    """Identifies the image (MME pairs, encoding cache)."""
    source: str
    """file:line."""
    options: list[str] | None = None
    hint: str | None = None
    category: str | None = None
    chance: float | None = None
    """Accuracy of a uniform guess, when the file gives it (short answers); see :func:`chance_level`."""
    task: str | None = None
    """The lmms-eval task whose prompt and scoring the item gets by default (``pope``, ``mme``,
    ``mmbench``, ``scienceqa``; :mod:`asvr.eval.lmms_rules`); None: the generic JSONL layout."""


def chance_level(item: BenchItem) -> float | None:
    """Expected accuracy of a uniform random guess: the file's ``chance`` when given, else
    1/2 for yes/no, 1/options for multiple choice; None for short answers without one
    (their answer space is open)."""
    if item.chance is not None:
        return item.chance
    if item.kind == "yes_no":
        return 0.5
    if item.kind == "multiple_choice" and item.options:
        return 1 / len(item.options)
    return None


def _chance(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise BenchError(f"{where}: chance must be a probability in (0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- helpers
def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _resolve_image(ref: str, roots: Sequence[Path], where: str) -> str:
    """``ref`` under the first root that has it; a path leaving the roots (absolute, ``..``, a
    symlink out) is refused, as the pipeline and the trainer refuse one (``paths.confine``)."""
    for root in roots:
        try:
            p = confine(root, ref)
        except UnsafePathError as e:
            raise BenchError(f"{where}: image {ref!r}: {str(e).replace('the image root', str(root))}") from None
        if p.is_file():
            return str(root / ref)
    tried = ", ".join(str(r) for r in roots)
    raise BenchError(f"{where}: image {ref!r} not found (looked under {tried})")


def _roots(path: Path, images: str | os.PathLike | None) -> list[Path]:
    return ([Path(images)] if images else []) + [path.parent]


def _gold(kind: str, answer, options: list[str] | None, where: str) -> tuple[str | None, str | None]:
    """-> (canonical gold, raw answer); raises on an answer that does not fit its kind."""
    if answer is None or (isinstance(answer, str) and answer.strip() in ("", "nan")):
        return None, None
    raw = str(answer)
    if kind == "yes_no":
        w = normalize_answer(raw)
        if w not in ("yes", "no"):
            raise BenchError(f"{where}: yes/no item with answer {raw!r}")
        return w, raw
    if kind == "multiple_choice":
        letter = parse_choice(raw, options or [])
        if letter is None:
            raise BenchError(f"{where}: answer {raw!r} is neither an option letter nor an option's text")
        return letter, raw
    g = normalize_answer(raw)
    if not g:
        raise BenchError(f"{where}: empty answer after normalisation ({raw!r})")
    return g, raw


def _options(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        keys = sorted(value)
        if keys != letters_for(keys):
            raise BenchError(f"{where}: options keys {keys} are not A, B, C, ...")
        value = [value[k] for k in keys]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(o, (str, int, float)) for o in value):
        raise BenchError(f"{where}: options must be a list of at least 2 strings")
    return [str(o) for o in value]


def _json_lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{_where(path, n)}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BenchError(f"{_where(path, n)}: expected a JSON object, got {type(rec).__name__}")
        if (bad := lone_surrogate(rec)) is not None:
            raise BenchError(
                f"{_where(path, n)}: {bad} holds a lone UTF-16 surrogate escape (such as \\ud800): not valid Unicode"
            )
        yield n, rec


@overload
def _text_field(rec: dict, names: Sequence[str], where: str, required: Literal[True] = True) -> str: ...


@overload
def _text_field(rec: dict, names: Sequence[str], where: str, required: bool) -> str | None: ...


def _text_field(rec: dict, names: Sequence[str], where: str, required: bool = True) -> str | None:
    for k in names:
        if k in rec and rec[k] is not None:
            if not isinstance(rec[k], (str, int, float)):
                raise BenchError(f"{where}: field {k!r} is not a string")
            return str(rec[k])
    if required:
        raise BenchError(f"{where}: missing field {names[0]!r}")
    return None


# --------------------------------------------------------------------------- readers
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


def _read_tsv_rows(path: Path):
    """(line number, fields) of a TSV file; fields may hold long base64 strings."""
    csv.field_size_limit(sys.maxsize)
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise BenchError(f"{path}: cannot read ({e})") from None
    with f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE if path.suffix == ".txt" else csv.QUOTE_MINIMAL)
        start = 1
        try:
            for row in reader:
                yield start, row
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise BenchError(f"{_where(path, start)}: cannot parse ({e})") from None


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
        gold, raw = _gold("yes_no", row[c["answer"]], None, where)
        if gold is None:
            raise BenchError(f"{where}: empty answer")
        image = _resolve_image(ref, roots, where)
        items.append(
            BenchItem(
                id=f"{cat}/{ref}#{len(items)}",
                question=row[c["question"]].strip(),
                kind="yes_no",
                answer=gold,
                raw_answer=raw,
                image=image,
                image_key=f"{cat}/{ref}",
                source=where,
                category=cat,
                task="mme",
            )
        )
    return items


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
                gold, raw = _gold("yes_no", row[1], None, where)
                if gold is None:
                    raise BenchError(f"{where}: empty answer")
                items.append(
                    BenchItem(
                        id=f"{category}/{f.stem}#{n}",
                        question=row[0].strip(),
                        kind="yes_no",
                        answer=gold,
                        raw_answer=raw,
                        image=image,
                        image_key=f"{category}/{f.stem}",
                        source=where,
                        category=category,
                        task="mme",
                    )
                )
    if not qa_dirs:
        files = sorted(p for p in root.iterdir() if p.suffix in (".txt", ".tsv") and p.is_file())
        if not files:
            raise BenchError(f"{root}: neither an MME release folder (*/questions_answers_YN) nor *.txt/*.tsv files")
        for f in files:
            items.extend(read_mme(f, images or root))
    return items


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


def read_scienceqa(path: Path, images=None) -> list[BenchItem]:
    """The ScienceQA TSV of VLMEvalKit (the MMBench layout): lmms-eval's ScienceQA prompt and scoring."""
    return read_mmbench(path, images, task="scienceqa")


def read_mmbench(path: Path, images=None, task: str = "mmbench") -> list[BenchItem]:
    roots = _roots(path, images)
    items: list[BenchItem] = []
    header: list[str] | None = None
    by_index: dict[str, bytes | str | None] = {}
    for n, row in _read_tsv_rows(path):
        where = _where(path, n)
        if header is None:
            header = [h.strip() for h in row]
            missing = [k for k in ("question", "A", "B", "answer") if k not in header]
            if missing:
                raise BenchError(f"{where}: MMBench header lacks column(s) {missing} (has {header[:12]})")
            continue
        if not any(x.strip() for x in row):
            continue
        if len(row) != len(header):
            raise BenchError(f"{where}: {len(row)} fields, the header has {len(header)}")
        rec = dict(zip(header, row))
        present = [c for c in letters_for(range(26)) if c in rec and rec[c].strip() not in ("", "nan")]
        if present != letters_for(present) or len(present) < 2:
            raise BenchError(f"{where}: options must be A, B[, C, ...] without gaps; got {present}")
        options = [rec[c].strip() for c in present]
        gold, raw = _gold("multiple_choice", rec["answer"], options, where)
        index = rec.get("index", str(n)).strip()
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
        hint = rec.get("hint", "").strip()
        key = image if image is None or isinstance(image, str) else "sha256:" + hashlib.sha256(image).hexdigest()
        items.append(
            BenchItem(
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
        )
    if header is None:
        raise BenchError(f"{path}: empty file")
    return items


# --------------------------------------------------------------------------- the layout registry
@dataclass(frozen=True)
class BenchFormat:
    """One benchmark layout.  ``read(path, images) -> items``; ``detect(path) -> bool`` (plug-ins
    are asked before the built-in rules); ``metrics(items, records) -> dict`` adds the layout's own
    metrics to the common ones (accuracy overall / per kind / per category); ``markdown(metrics)
    -> lines`` renders them for report.md, and ``generic_tables`` keeps the per-kind/category tables.
    ``lmms_parse(prediction) -> parsed`` is lmms-eval's answer parser for the yes/no layouts
    lmms-eval scores, ``lmms_choice(prediction, options) -> letter`` for its multiple-choice
    ones (``--scoring lmms-eval``, the default); ``metrics`` is told which scoring ran."""

    name: str
    read: Callable[[Path, str | os.PathLike | None], list[BenchItem]]
    detect: Callable[[Path], bool] | None = None
    metrics: Callable[[Sequence[BenchItem], Sequence[dict], bool], dict] | None = None
    markdown: Callable[[dict], list[str]] | None = None
    generic_tables: bool = True
    reads_folders: bool = False
    lmms_parse: Callable[[str], str | None] | None = None
    lmms_choice: Callable[[str, Sequence[str]], str | None] | None = None

    @property
    def lmms_scored(self) -> bool:
        return self.lmms_parse is not None or self.lmms_choice is not None


FORMATS: Registry[BenchFormat] = Registry("benchmark format", "asvr.eval.formats", "", reserved=("auto",))
_BUILTIN = ("jsonl", "pope", "mme", "mmbench", "scienceqa")


def register_bench_format(fmt: BenchFormat) -> BenchFormat:
    return FORMATS.register(fmt.name, fmt)


def bench_formats() -> dict[str, BenchFormat]:
    """name -> layout: the built-ins, then every ``asvr.eval.format_*`` module (imported once)."""
    return FORMATS.all()


def bench_format(name: str) -> BenchFormat:
    formats = bench_formats()
    if name not in formats:
        raise BenchError(f"format must be one of auto, {', '.join(formats)}; got {name!r}")
    return formats[name]


def detect_format(path: Path) -> str:
    """Guess the layout of ``path`` from its content (see module doc)."""
    for fmt in bench_formats().values():
        if fmt.name not in _BUILTIN and fmt.detect is not None and fmt.detect(path):
            return fmt.name
    if path.is_dir():
        return "mme"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline(1 << 16)
    except OSError as e:
        raise BenchError(f"{path}: cannot read ({e})") from None
    if first.lstrip().startswith("{"):
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            return "jsonl"  # the reader reports the line
        return "pope" if isinstance(rec, dict) and {"label", "text", "question_id"} <= set(rec) else "jsonl"
    cols = [c.strip() for c in first.rstrip("\r\n").split("\t")]
    if {"question", "A", "B", "answer"} <= set(cols):
        name = path.name.lower()
        return "scienceqa" if "scienceqa" in name or name.startswith("sqa") else "mmbench"
    if "\t" in first:
        return "mme"
    raise BenchError(f"{path}:1: cannot tell the format (not JSON lines, nor a TSV); pass --format")


def read_bench(
    path: str | os.PathLike, fmt: str = "auto", images: str | os.PathLike | None = None
) -> tuple[str, list[BenchItem]]:
    """-> (format, items).  Raises :class:`BenchError` (one line, file:line)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"{path}: no such file or folder")
    if fmt != "auto":
        bench_format(fmt)
    fmt = detect_format(path) if fmt == "auto" else fmt
    layout = bench_format(fmt)
    if path.is_dir() and not layout.reads_folders:
        raise BenchError(
            f"{path}: a folder is only read as {', '.join(f for f, x in bench_formats().items() if x.reads_folders)}"
        )
    items = layout.read(path, images)
    if not items:
        raise BenchError(f"{path}: no benchmark items")
    first: dict[str, str] = {}
    for it in items:  # predictions are matched to items by id (asvr-eval score, reports)
        if first.setdefault(it.id, it.source) != it.source:
            raise BenchError(
                f"{it.source}: duplicate id {it.id!r} (first at {first[it.id]}): ids must be unique, "
                "predictions are matched to questions by id"
            )
    return fmt, items


# --------------------------------------------------------------------------- the built-in layouts
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


register_bench_format(BenchFormat("jsonl", read_jsonl))
register_bench_format(
    BenchFormat(
        "pope",
        read_pope,
        metrics=_pope_metrics,
        markdown=_pope_markdown,
        generic_tables=False,
        lmms_parse=parse_pope_lmms,
    )
)
register_bench_format(
    BenchFormat(
        "mme",
        read_mme,
        metrics=_mme_metrics,
        markdown=_mme_markdown,
        generic_tables=False,
        reads_folders=True,
        lmms_parse=parse_mme_otter,
    )
)


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
        metrics=_mmbench_metrics,
        markdown=_mmbench_markdown,
        lmms_choice=_lmms_choice("mmbench"),
    )
)
register_bench_format(BenchFormat("scienceqa", read_scienceqa, lmms_choice=_lmms_choice("scienceqa")))
