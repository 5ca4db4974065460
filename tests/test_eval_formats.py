"""asvr.eval.formats: each built-in layout read from generated files; bad lines name file:line."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from asvr.eval.bench import bench_metrics, score_items
from asvr.eval.formats.base import BenchError, chance_level, detect_format, read_bench
from conftest import image_bytes


@pytest.fixture()
def root(tmp_path) -> Path:
    for i in range(3):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        (tmp_path / "imgs" / f"im{i}.jpg").write_bytes(image_bytes(i))
    return tmp_path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_generic_jsonl(root):
    f = _jsonl(
        root / "b.jsonl",
        [
            {"id": "1", "image": "im0.jpg", "question": "Is it red?", "answer": "Yes"},
            {
                "image": "im1.jpg",
                "question": "Colour?",
                "options": ["red", "green"],
                "answer": "green",
                "category": "c",
            },
            {"image": "im1.jpg", "question": "Colour?", "options": {"A": "red", "B": "green"}, "answer": "(A)"},
            {"question": "Two plus two?", "answer": "Four", "type": "short"},
            "",
        ],
    )
    fmt, items = read_bench(f, images=root / "imgs")
    assert fmt == "jsonl" and len(items) == 4
    assert [it.kind for it in items] == ["yes_no", "multiple_choice", "multiple_choice", "short"]
    assert [it.answer for it in items] == ["yes", "B", "A", "4"]
    assert items[0].image == str(root / "imgs" / "im0.jpg") and items[3].image is None
    assert items[1].category == "c" and items[1].options == ["red", "green"]
    assert items[1].source == f"{f}:2"
    assert [chance_level(it) for it in items] == [0.5, 0.5, 0.5, None]  # open short answer: unknown


def test_chance_levels_beside_the_scores(root):
    f = _jsonl(
        root / "b.jsonl",
        [
            {"image": "im0.jpg", "question": "Is it red?", "answer": "yes", "category": "colour"},
            {
                "image": "im1.jpg",
                "question": "Colour?",
                "options": ["red", "green", "blue", "white"],
                "answer": "B",
                "category": "colour",
            },
            {
                "image": "im1.jpg",
                "question": "How many?",
                "answer": "3",
                "type": "short",
                "chance": 0.25,
                "category": "count",
            },
        ],
    )
    _, items = read_bench(f, images=root / "imgs")
    assert [chance_level(it) for it in items] == [0.5, 0.25, 0.25]
    m = bench_metrics("jsonl", items, score_items(items, ["Yes", "A", "3"]))
    assert m["acc"] == pytest.approx(2 / 3) and m["chance"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert m["by_kind"]["multiple_choice"] == {"n": 1, "correct": 0, "acc": 0.0, "chance": 0.25}
    assert m["by_category"]["colour"]["chance"] == pytest.approx(0.375)
    # one item of unknown chance makes its groups' chance unknown, not a wrong number
    _, items = read_bench(
        _jsonl(
            root / "c.jsonl",
            [{"question": "Two plus two?", "answer": "4", "type": "short"}, {"question": "Ok?", "answer": "yes"}],
        )
    )
    m = bench_metrics("jsonl", items, score_items(items, ["4", "no"]))
    assert m["chance"] is None and m["by_kind"]["yes_no"]["chance"] == 0.5


@pytest.mark.parametrize(
    "bad, msg",
    [
        ('{"image": "im0.jpg", "question": "q", "answer": "yes"', "not valid JSON"),
        ('{"image": "nope.jpg", "question": "q", "answer": "yes"}', "not found"),
        ('{"image": "im0.jpg", "answer": "yes"}', "missing field 'question'"),
        ('{"image": "im0.jpg", "question": "q", "options": ["a", "b"], "answer": "C"}', "neither an option letter"),
        ('{"image": "im0.jpg", "question": "q", "type": "yes_no", "answer": "maybe"}', "yes/no item"),
        ("[1, 2]", "expected a JSON object"),
        ('{"image": "im0.jpg", "question": "q", "answer": "yes", "chance": 1.5}', "chance must be a probability"),
    ],
)
def test_generic_jsonl_bad_line_names_file_and_line(root, bad, msg):
    good = {"image": "im0.jpg", "question": "q", "answer": "yes"}
    f = _jsonl(root / "b.jsonl", [good, good, bad])
    with pytest.raises(BenchError, match=rf"b\.jsonl:3: .*{msg}"):
        read_bench(f, "jsonl", images=root / "imgs")


def test_pope(root):
    rows = [
        {"question_id": i, "image": f"im{i % 3}.jpg", "text": f"Is there a cat {i}?", "label": lab}
        for i, lab in enumerate(["yes", "no", "no", "yes"])
    ]
    f = _jsonl(root / "imgs" / "coco_pope_random.json", rows)
    assert detect_format(f) == "pope"
    fmt, items = read_bench(f)  # images next to the file
    assert fmt == "pope" and [it.answer for it in items] == ["yes", "no", "no", "yes"]
    assert {it.category for it in items} == {"coco_pope_random"} and items[1].id == "1"
    rows[2]["label"] = "perhaps"
    _jsonl(f, rows)
    with pytest.raises(BenchError, match=r"coco_pope_random\.json:3: yes/no item"):
        read_bench(f)
    del rows[2]["text"]
    _jsonl(f, rows)
    with pytest.raises(BenchError, match=r":3: POPE record without 'text'"):
        read_bench(f)


def test_mme_file_folder_and_release(root):
    lines = ["im0.jpg\tIs there a cat?\tYes", "im0.jpg\tIs there a dog?\tNo", "im1.jpg\tIs it red?\tNo\tYes"]
    f = root / "imgs" / "existence.txt"
    f.write_text("\n".join(lines) + "\n")
    assert detect_format(f) == "mme"
    fmt, items = read_bench(f)
    assert fmt == "mme" and [it.answer for it in items] == ["yes", "no", "no"]
    assert {it.category for it in items} == {"existence"}
    assert items[0].image_key == items[1].image_key != items[2].image_key
    # header with a category column
    g = root / "imgs" / "mme.tsv"
    g.write_text("category\timage\tquestion\tanswer\ncount\tim2.jpg\tTwo cats?\tyes\n")
    assert read_bench(g, "mme")[1][0].category == "count"
    # the release layout: <category>/questions_answers_YN/<image>.txt + <category>/images/<image>.*
    rel = root / "MME"
    (rel / "OCR" / "questions_answers_YN").mkdir(parents=True)
    (rel / "OCR" / "images").mkdir()
    (rel / "OCR" / "images" / "p1.png").write_bytes(image_bytes(5, "PNG"))
    (rel / "OCR" / "questions_answers_YN" / "p1.txt").write_text("Does it say A?\tYes\nDoes it say B?\tNo\n")
    fmt, items = read_bench(rel)
    assert fmt == "mme" and [(it.category, it.answer) for it in items] == [("OCR", "yes"), ("OCR", "no")]
    assert items[0].image.endswith("p1.png")
    # a bad line
    f.write_text("\n".join(lines[:2] + ["im1.jpg\tno answer here"]) + "\n")
    with pytest.raises(BenchError, match=r"existence\.txt:3: expected tab-separated"):
        read_bench(f)


def test_mmbench_tsv_base64_and_path(root):
    b64 = base64.b64encode(image_bytes(7)).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\tcategory"
    rows = [
        f"0\tWhat colour?\tLook closely.\tred\tgreen\tblue\t\tB\t{b64}\tcolour",
        "1\tWhich shape?\tnan\tcircle\tsquare\t\t\tA\tim0.jpg\tshape",
        "1000000\tWhat colour?\t\tgreen\tred\tblue\t\tA\t0\tcolour",
    ]  # circular copy: image by index
    f = root / "MMBench_DEV_EN.tsv"
    f.write_text("\n".join([header, *rows]) + "\n")
    assert detect_format(f) == "mmbench"
    fmt, items = read_bench(f, images=root / "imgs")
    assert fmt == "mmbench" and len(items) == 3
    assert items[0].options == ["red", "green", "blue"] and items[0].answer == "B" and items[0].hint == "Look closely."
    assert isinstance(items[0].image, bytes) and items[0].image == image_bytes(7)
    assert items[1].options == ["circle", "square"] and items[1].hint is None
    assert items[1].image == str(root / "imgs" / "im0.jpg")
    assert items[2].image == items[0].image and items[2].image_key == items[0].image_key
    f.write_text("\n".join([header, rows[0], "2\tQ?\t\tx\ty\t\t\tA\t@@not-base64@@\tc"]) + "\n")
    with pytest.raises(BenchError, match=r"MMBench_DEV_EN\.tsv:3: image is neither base64"):
        read_bench(f)
    f.write_text("\n".join([header, rows[0], "2\tQ?\t\tx\t\tz\t\tA\tim0.jpg\tc"]) + "\n")
    with pytest.raises(BenchError, match=r"\.tsv:3: options must be A, B"):
        read_bench(f, images=root / "imgs")


def test_unknown_layout_and_missing_file(root):
    f = root / "x.txt"
    f.write_text("just some words\n")
    with pytest.raises(BenchError, match=r"x\.txt:1: cannot tell the format"):
        read_bench(f)
    with pytest.raises(BenchError, match="no such file"):
        read_bench(root / "missing.jsonl")


def test_a_registered_layout_is_read_scored_and_reported(root):
    """What an ``asvr/eval/formats/<name>.py`` module does: register a layout; nothing else changes."""
    from asvr.eval.bench import bench_metrics, score_items
    from asvr.eval.formats.base import FORMATS, BenchFormat, BenchItem, register_bench_format
    from asvr.eval.report import bench_markdown

    def read_qa(path, images=None):
        return [
            BenchItem(
                id=str(i),
                question=q,
                kind="short",
                answer=a,
                raw_answer=a,
                image=None,
                image_key=None,
                source=f"{path}:{i + 1}",
            )
            for i, (q, a) in enumerate(line.split("=") for line in path.read_text().splitlines())
        ]

    register_bench_format(
        BenchFormat(
            "qa",
            read_qa,
            detect=lambda p: p.suffix == ".qa",
            metrics=lambda items, recs, lmms: {"qa_n": len(recs)},
            markdown=lambda m: [f"qa items: {m['qa_n']}", ""],
        )
    )
    try:
        f = root / "tiny.qa"
        f.write_text("one plus one=2\nsky colour=blue\n")
        assert detect_format(f) == "qa"
        fmt, items = read_bench(f)
        assert fmt == "qa" and [it.answer for it in items] == ["2", "blue"]
        m = bench_metrics(fmt, items, score_items(items, ["2", "red"]))
        assert m["qa_n"] == 2 and m["acc"] == 0.5
        model = {"model": "m", "vision_input": "codes", "template": "plain", "template_source": "flag", "device": "cpu"}
        md = bench_markdown(
            {
                "kind": "bench",
                "model": model,
                "config": {"max_new_tokens": 8, "instructions": "none"},
                "benches": [{"file": str(f), "format": fmt, "metrics": m, "seconds": 0.1, "predictions": "p.jsonl"}],
            }
        )
        assert "qa items: 2" in md
    finally:
        FORMATS.unregister("qa")
    with pytest.raises(BenchError, match="format must be one of auto, jsonl, pope, mme, mmbench, scienceqa; got 'qa'"):
        read_bench(f, "qa")


def test_a_plugin_is_asked_before_the_built_in_rules(root):
    """A plug-in layout recognising its own JSON lines claims them before the built-in ``jsonl``
    rule does; the built-ins are still listed first and detect as before once it is gone."""
    from asvr.eval.formats.base import FORMATS, BenchFormat, bench_formats, register_bench_format

    f = root / "mine.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "yes", "mine": True}) + "\n")
    register_bench_format(BenchFormat("mine", lambda p, images=None: [], detect=lambda p: '"mine"' in p.read_text()))
    try:
        assert detect_format(f) == "mine"
        assert list(bench_formats()) == ["jsonl", "pope", "mme", "mmbench", "scienceqa", "mine"]
    finally:
        FORMATS.unregister("mine")
    assert detect_format(f) == "jsonl"
