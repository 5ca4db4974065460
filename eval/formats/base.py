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

The layouts are a registry of :class:`BenchFormat` plug-ins (reader,
detection, the layout's own metrics and report tables), and the built-ins are
written as plug-ins, one module each (``jsonl.py``, ``pope.py``, ``mme.py``,
``mmbench.py``, ``scienceqa.py``); this module keeps the item and format types,
the registry, the helpers the readers share (image resolution, gold answers,
JSON lines, TSV rows, :func:`sniff`), detection and :func:`read_bench`.
Adding a layout is one module in ``asvr/eval/formats/`` (and its test) that
calls :func:`register_bench_format`: every module of the package is imported
by :func:`bench_formats` on its first call, so ``--format``, auto-detection,
``asvr-eval bench``'s metrics and ``report.md`` all see it.  Detection asks
the formats without ``detect_last`` first (a plug-in that recognises its
files), then the built-ins, whose rules exclude each other (a ``pope`` first
record is not ``jsonl``; an MMBench header is ``scienceqa`` by file name).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence, overload

from asvr.core.llava_json import lone_surrogate
from asvr.core.paths import UnsafePathError, confine
from asvr.core.errors import AsvrError
from asvr.core.registry import Registry

from asvr.eval.scoring import letters_for, normalize_answer, parse_choice

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
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 etc. are JSON text
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


# --------------------------------------------------------------------------- the layout registry
@dataclass(frozen=True)
class BenchFormat:
    """One benchmark layout.  ``read(path, images) -> items``; ``detect(path) -> bool`` (formats
    with ``detect_last`` are asked after the others); ``metrics(items, records) -> dict`` adds the layout's own
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
    detect_last: bool = False
    """Asked after the formats without it (the built-ins: their rules are generic)."""

    @property
    def lmms_scored(self) -> bool:
        return self.lmms_parse is not None or self.lmms_choice is not None


FORMATS: Registry[BenchFormat] = Registry(
    "benchmark format",
    "asvr.eval.formats",
    "",
    reserved=("auto",),
    first=("jsonl", "pope", "mme", "mmbench", "scienceqa"),
)


def register_bench_format(fmt: BenchFormat) -> BenchFormat:
    return FORMATS.register(fmt.name, fmt)


def bench_formats() -> dict[str, BenchFormat]:
    """name -> layout: every module of ``asvr.eval.formats`` (imported once), built-ins first."""
    return FORMATS.all()


def bench_format(name: str) -> BenchFormat:
    formats = bench_formats()
    if name not in formats:
        raise BenchError(f"format must be one of auto, {', '.join(formats)}; got {name!r}")
    return formats[name]


@dataclass(frozen=True)
class Sniff:
    """What detection looks at: whether ``path`` is a folder, else its first line (64 KiB at most)."""

    path: Path
    folder: bool
    line: str

    @property
    def json_start(self) -> bool:
        return self.line.lstrip().startswith("{")

    @property
    def record(self) -> object:
        """The first line as JSON (None when it does not parse)."""
        try:
            return json.loads(self.line)
        except json.JSONDecodeError:
            return None

    @property
    def columns(self) -> set[str]:
        """The first line's tab-separated fields, stripped."""
        return {c.strip() for c in self.line.rstrip("\r\n").split("\t")}


def sniff(path: Path) -> Sniff:
    if path.is_dir():
        return Sniff(path, True, "")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return Sniff(path, False, f.readline(1 << 16))
    except OSError as e:
        raise BenchError(f"{path}: cannot read ({e})") from None


def detect_format(path: Path) -> str:
    """Guess the layout of ``path`` from its content (see module doc)."""
    formats = list(bench_formats().values())
    for fmt in [f for f in formats if not f.detect_last] + [f for f in formats if f.detect_last]:
        if fmt.detect is not None and fmt.detect(path):
            return fmt.name
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
