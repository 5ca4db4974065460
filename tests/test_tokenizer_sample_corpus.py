"""The offline sample corpus: deterministic, well-formed, answers consistent with the scenes."""

from __future__ import annotations

import hashlib
import json

from PIL import Image

from asvr.demo.sample_corpus import make_corpus


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_corpus_is_deterministic_and_well_formed(tmp_path):
    a = make_corpus(tmp_path / "a", n=30, seed=3, progress=False)
    make_corpus(tmp_path / "b", n=30, seed=3, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_corpus(tmp_path / "c", n=30, seed=4, progress=False)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    root = tmp_path / "a"
    assert a.train_images == 27 and a.heldout_images == 3
    caps = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == 30
    formats, sizes = set(), set()
    for c in caps:
        with Image.open(root / "images" / c["image"]) as im:
            assert im.size == (c["width"], c["height"])
            formats.add(im.format)
            sizes.add(im.size)
        assert 1 <= len(c["objects"]) <= 3
        for o in c["objects"]:
            assert o["colour"] in c["caption"] and o["kind"] in c["caption"]
    assert formats == {"PNG", "JPEG"} and len(sizes) > 10
    by_image = {c["image"]: c for c in caps}
    pre = json.loads((root / "llava_pretrain.json").read_text())
    assert len(pre) == 27 and all(r["conversations"][0]["value"] == "<image>" for r in pre)
    assert all(by_image[r["image"]]["split"] == "train" for r in pre)
    sft = json.loads((root / "llava_sft.json").read_text())
    text_only = [r for r in sft if "image" not in r]
    assert text_only and all("<image>" not in t["value"] for r in text_only for t in r["conversations"])
    for r in sft:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        if "image" in r:
            assert turns[0]["value"].startswith("<image>\n")
            for q, a in zip(turns[::2], turns[1::2]):
                if q["value"].endswith("How many shapes are in the image?"):
                    assert a["value"] == f"{len(by_image[r['image']]['objects'])}."
    held = json.loads((root / "heldout_sft.json").read_text())
    assert {r["image"] for r in held} == {c["image"] for c in caps if c["split"] == "heldout"}
    vqa = [json.loads(line) for line in (root / "vqa_bench.jsonl").read_text().splitlines()]
    types = {v["type"] for v in vqa}
    assert {"yes_no", "short"} <= types
    for v in vqa:
        objs = by_image[v["image"]]["objects"]
        if v["type"] == "yes_no":
            colour_kind = v["question"].split(" in the image")[0].split()[-2:]
            present = any([o["colour"], o["kind"]] == colour_kind for o in objs)
            assert v["answer"] == ("yes" if present else "no")
        elif v["type"] == "multiple_choice":
            assert len(v["options"]) == 4 and v["answer"] in "ABCD"
            right = v["options"]["ABCD".index(v["answer"])]
            assert any(right in (o["colour"], o["kind"]) for o in objs)
        else:
            assert v["answer"] == str(len(objs))
