"""The procedural VQA corpus: deterministic, balanced, held-out pairs truly unseen, answers true to the pixels."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
from PIL import Image

from asvr.eval.formats.base import chance_level, read_bench
from asvr.demo.vqa_corpus import CATEGORIES, COLOURS, DESCRIBE, FORMS, SHAPES, make_vqa_corpus


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _corpus(tmp_path, name="a", seed=3, **kw):
    args = dict(train=30, heldout=10, free=5, seed=seed, questions_per_image=3, bench_per_image=3, progress=False)
    args.update(kw)
    make_vqa_corpus(tmp_path / name, **args)
    root = tmp_path / name
    scenes = [json.loads(x) for x in (root / "scenes.jsonl").read_text().splitlines()]
    bench = [json.loads(x) for x in (root / "vqa_bench.jsonl").read_text().splitlines()]
    return root, scenes, bench


def test_deterministic_by_seed(tmp_path):
    a, _, _ = _corpus(tmp_path, "a")
    b, _, _ = _corpus(tmp_path, "b")
    c, _, _ = _corpus(tmp_path, "c", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # an image does not depend on the other counts
    d, _, _ = _corpus(tmp_path, "d", train=12, heldout=3, free=0)
    assert (a / "images/train/00/scene_00007.png").read_bytes() == (d / "images/train/00/scene_00007.png").read_bytes()


def test_question_types_and_answers_are_balanced(tmp_path):
    root, _, bench = _corpus(tmp_path, train=30, heldout=10)  # 30 = 2 x (5 categories x 3 forms) bench items
    assert Counter((b["category"], b["type"]) for b in bench) == {(c, f): 2 for c in CATEGORIES for f in FORMS}
    sft = json.loads((root / "llava_sft.json").read_text())
    turns = [
        (h["value"].removeprefix("<image>\n"), g["value"])
        for r in sft
        for h, g in zip(r["conversations"][::2], r["conversations"][1::2])
    ]
    assert all(r["conversations"][-2]["value"] == DESCRIBE for r in sft)  # the description comes last
    prompts, replies = zip(*[(p, g) for p, g in turns if p != DESCRIBE])
    assert len(prompts) == 90
    yes_no = [r for p, r in zip(prompts, replies) if p.endswith("single word or phrase.") and r in ("Yes", "No")]
    assert Counter(yes_no) == {"Yes": 15, "No": 15}
    mc = [(p.count("\n") - 1, r) for p, r in zip(prompts, replies) if p.endswith("directly.")]
    assert len(mc) == 30
    for n_options in (3, 4):  # the right letter cycles through the options
        letters = Counter(r for n, r in mc if n == n_options)
        assert set(letters) == set("ABCD"[:n_options]) and max(letters.values()) - min(letters.values()) <= 1
    # no turn gives away a later one: the turns of one image ask different categories (held-out SFT
    # has the same plan; its categories are readable from the question stems)
    stems = {
        "colour": ("What colour", "Is the circle", "Is the square", "Is the triangle", "Is the star"),
        "shape": ("What shape", "object a "),
        "count": ("How many", "Are there"),
        "position": ("relative to", " the left of", " the right of", " above the ", " below the "),
        "size": ("What size", " small?", " medium?", " large?"),
    }

    def category(q):
        hits = {c for c, keys in stems.items() for k in keys if k in q}
        assert len(hits) == 1, q
        return hits.pop()

    for r in sft:
        qs = [
            t["value"].removeprefix("<image>\n").split("\n")[0] for t in r["conversations"][:-2] if t["from"] == "human"
        ]
        assert len({category(q) for q in qs}) == len(qs) == 3
    # any form can come first (a benchmark asks one question per prompt)
    first = Counter(r["conversations"][1]["value"] in ("Yes", "No") for r in sft)
    assert first[True] > 0 and first[False] > 0


def test_heldout_pairs_never_seen_in_training(tmp_path):
    root, scenes, bench = _corpus(tmp_path, train=60, heldout=12, free=10)
    held = set(json.loads((root / "corpus.json").read_text())["heldout_pairs"])
    assert len(held) == len(SHAPES)
    for s in scenes:
        pairs = {f"{o['colour']} {o['shape']}" for o in s["objects"]}
        assert len(pairs & held) == (1 if s["split"] == "heldout" else 0), s
    pre = json.loads((root / "llava_pretrain.json").read_text())
    sft = json.loads((root / "llava_sft.json").read_text())
    train_text = json.dumps(pre) + json.dumps(sft)
    assert all(h not in train_text for h in held)
    trained = {r["image"] for r in pre + sft}
    assert trained == {s["image"] for s in scenes if s["split"] == "train"}  # free and held-out images: no text
    assert {b["image"] for b in bench} == {s["image"] for s in scenes if s["split"] == "heldout"}
    # colour questions ask about the held-out object: its colour-shape pair is unseen
    by_image = {s["image"]: s for s in scenes}
    for b in bench:
        if b["category"] == "colour" and b["type"] == "short":
            shape = b["question"].split("the ")[1].rstrip("?")
            obj = next(o for o in by_image[b["image"]]["objects"] if o["shape"] == shape)
            assert f"{b['answer']} {shape}" in held and obj["colour"] == b["answer"]
    # the second bench asks the same images about their other objects: pairs seen in training
    seen = [json.loads(x) for x in (root / "vqa_bench_seen.jsonl").read_text().splitlines()]
    assert {b["image"] for b in seen} == {b["image"] for b in bench}
    cells = Counter((b["category"], b["type"]) for b in seen)  # 12 images: 2 balanced blocks of 5 + 2
    assert len(seen) == len(bench) and len(cells) == 15 and max(cells.values()) - min(cells.values()) <= 1
    asked = 0
    for b in seen:
        objs = by_image[b["image"]]["objects"]
        if b["category"] == "colour" and b["type"] == "short":
            shape = b["question"].split("the ")[1].rstrip("?")
            obj = next(o for o in objs if o["shape"] == shape)
            assert f"{b['answer']} {shape}" not in held and obj["colour"] == b["answer"]
            asked += 1
        if b["category"] == "size" and b["type"] == "short":  # "What size is the <colour> <shape>?"
            name = b["question"].removeprefix("What size is the ").rstrip("?")
            obj = next(o for o in objs if f"{o['colour']} {o['shape']}" == name)
            assert name not in held and obj["size"] == b["answer"]
            asked += 1
    assert asked >= 4


def test_answers_match_the_pixels_and_the_bench_reads(tmp_path):
    root, scenes, bench = _corpus(tmp_path)
    by_image = {s["image"]: s for s in scenes}
    for s in scenes:
        img = np.asarray(Image.open(root / "images" / s["image"]).convert("RGB"))
        assert img.shape == (224, 224, 3)
        for o in s["objects"]:  # the centre of an object's cell is inside the object
            y, x = int((o["row"] + 0.5) * 224 / 3), int((o["col"] + 0.5) * 224 / 3)
            assert tuple(img[y, x]) == COLOURS[o["colour"]], (s["image"], o)
        assert 2 <= len(s["objects"]) <= 4
        assert len({o["colour"] for o in s["objects"]}) == len({o["shape"] for o in s["objects"]}) == len(s["objects"])
    for b in bench:
        objs = by_image[b["image"]]["objects"]
        if b["category"] == "count" and b["type"] == "short":
            assert b["answer"] == str(len(objs))
        if b["category"] == "shape" and b["type"] == "multiple_choice":
            colour = b["question"].split("the ")[1].split(" object")[0]
            gold = next(o["shape"] for o in objs if o["colour"] == colour)
            assert b["options"]["ABCD".index(b["answer"])] == gold
        if b["category"] == "position" and b["type"] == "short":
            q = b["question"].split("Where is the ")[1].split("?")[0]
            a_name, b_name = q.split(" relative to the ")
            a = next(o for o in objs if f"{o['colour']} {o['shape']}" == a_name)
            o2 = next(o for o in objs if f"{o['colour']} {o['shape']}" == b_name)
            truth = {
                "left": a["col"] < o2["col"],
                "right": a["col"] > o2["col"],
                "above": a["row"] < o2["row"],
                "below": a["row"] > o2["row"],
            }
            assert truth[b["answer"]]
    fmt, items = read_bench(root / "vqa_bench.jsonl", images=root / "images")
    assert fmt == "jsonl"
    assert len(items) == len(bench)
    ch = {(it.kind, it.category): chance_level(it) for it in items}
    assert ch[("yes_no", "colour")] == 0.5 and ch[("multiple_choice", "colour")] == 0.25
    assert abs(ch[("short", "colour")] - 1 / len(COLOURS)) < 1e-5 and abs(ch[("short", "size")] - 1 / 3) < 1e-5
