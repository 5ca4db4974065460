"""An offline sample corpus of procedural scenes (what ``make demo`` runs on).

``python -m asvr.demo.sample_corpus --out DIR --n 600 --seed 0`` writes::

    DIR/images/train/NN/scene_XXXXX.{png,jpg}     PIL-drawn scenes, varied sizes and aspect ratios
    DIR/images/heldout/NN/scene_XXXXX.{png,jpg}
    DIR/captions.jsonl          {"image", "split", "width", "height", "caption", "background", "objects": [...]}
    DIR/llava_pretrain.json     LLaVA, plain style: human "<image>" / gpt caption          (train images)
    DIR/llava_sft.json          LLaVA, questions on colour / shape / count / position with short answers,
                                plus a few text-only conversations (no "image")           (train images)
    DIR/heldout_pretrain.json   the same two formats on the held-out images
    DIR/heldout_sft.json
    DIR/vqa_bench.jsonl         {"id", "image", "question", "answer", "type", ["options"]} on held-out images;
                                type "yes_no" (answer yes/no), "multiple_choice" (options list, answer the
                                letter A-D of the right option) or "short" (one word / number)
    DIR/corpus.json             counts, seed

``image`` fields are paths relative to ``DIR/images`` (what a folder input of
``asvr-pipeline`` uses as key).  A scene holds 1-3 shapes of named colours,
kinds and sizes at distinct named positions (a 3x3 grid) on a plain,
gradient, striped, checkered, dotted or noisy background.  Each image is drawn
from ``default_rng([seed, index])``, so the corpus is deterministic and an
image does not depend on ``--n``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.errors import run_guarded

COLOURS = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (30, 70, 210),
    "yellow": (245, 215, 40),
    "orange": (250, 140, 20),
    "purple": (130, 50, 170),
    "pink": (245, 120, 180),
    "brown": (125, 75, 35),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
    "cyan": (40, 200, 220),
}
BACKGROUNDS = {
    "beige": (225, 210, 180),
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 75),
    "light blue": (180, 205, 235),
    "pale green": (195, 225, 190),
    "navy": (25, 35, 80),
    "cream": (245, 240, 220),
}
TEXTURES = ("plain", "gradient", "striped", "checkered", "dotted", "noisy")
KINDS = ("circle", "square", "triangle", "star", "diamond", "rectangle")
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3)]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
TEXT_ONLY = [
    ("What colour do you get by mixing blue and yellow?", "Green."),
    ("How many sides does a triangle have?", "Three."),
    ("What is two plus three?", "Five."),
    ("Name a shape with four equal sides.", "A square."),
    ("Is a circle round?", "Yes."),
    ("What colour is the sky on a clear day?", "Blue."),
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"{article(self.size)} {self.size} {self.colour} {self.kind}"


@dataclass
class Scene:
    image: str
    split: str
    width: int
    height: int
    background: str
    texture: str
    objects: list[Shape]

    @property
    def caption(self) -> str:
        parts = [
            f"{s.phrase()} at the {s.position}" if s.position != "center" else f"{s.phrase()} in the center"
            for s in self.objects
        ]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        words = self.background if self.texture == "plain" else f"{self.texture} {self.background}"
        bg = f"{article(words)} {words} background"
        return f"{body[0].upper()}{body[1:]} on {bg}."


# --------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, w: int, h: int, rgb, texture: str) -> Image.Image:
    base = np.asarray(rgb, np.float32)
    other = np.clip(base + rng.uniform(-60, 60, 3), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if texture == "gradient":
        t = (xx / max(1, w - 1)) if rng.random() < 0.5 else (yy / max(1, h - 1))
        arr = base * (1 - t[..., None]) + other * t[..., None]
    elif texture == "striped":
        period = rng.integers(8, 24)
        t = ((xx + yy * rng.integers(0, 2)) // period) % 2
        arr = np.where(t[..., None] > 0, other, base)
    elif texture == "checkered":
        period = rng.integers(10, 30)
        t = ((xx // period) + (yy // period)) % 2
        arr = np.where(t[..., None] > 0, other, base)
    elif texture == "noisy":
        arr = base + rng.normal(0, 18, (h, w, 3))
    else:
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if texture == "dotted":
        d = ImageDraw.Draw(img)
        step = int(rng.integers(12, 28))
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=tuple(int(v) for v in other))
    return img


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "star":
        return [
            (
                cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    raise ValueError(kind)


def _draw_shape(d: ImageDraw.ImageDraw, s: Shape, w: int, h: int, rng: np.random.Generator) -> None:
    col, row = POSITIONS.index(s.position) % 3, POSITIONS.index(s.position) // 3
    cx = (col + 0.5 + rng.uniform(-0.12, 0.12)) * w / 3
    cy = (row + 0.5 + rng.uniform(-0.12, 0.12)) * h / 3
    r = SIZES[s.size] * min(w, h) * 0.5 * rng.uniform(0.9, 1.1)
    fill = COLOURS[s.colour]
    outline = (0, 0, 0) if s.colour != "black" else (255, 255, 255)
    if s.kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif s.kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif s.kind == "rectangle":
        d.rectangle([cx - 1.4 * r, cy - 0.7 * r, cx + 1.4 * r, cy + 0.7 * r], fill=fill, outline=outline)
    else:
        d.polygon(_polygon(s.kind, cx, cy, r), fill=fill, outline=outline)


def make_scene(seed: int, index: int, split: str) -> tuple[Scene, Image.Image, str]:
    """One scene -> (description, image, format)."""
    rng = np.random.default_rng([seed, index])
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    long_side = int(rng.integers(160, 641))
    w, h = (long_side, max(32, long_side * ah // aw)) if aw >= ah else (max(32, long_side * aw // ah), long_side)
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    n = int(rng.integers(1, 4))
    colours = [c for c in COLOURS if np.abs(np.subtract(COLOURS[c], BACKGROUNDS[bg_name])).sum() > 120]
    picked = rng.choice(len(colours), n, replace=False)
    positions = rng.choice(len(POSITIONS), n, replace=False)
    objects = [
        Shape(
            kind=KINDS[rng.integers(len(KINDS))],
            colour=colours[c],
            size=list(SIZES)[rng.integers(3)],
            position=POSITIONS[p],
        )
        for c, p in zip(picked, positions)
    ]
    img = _background(rng, w, h, BACKGROUNDS[bg_name], texture)
    d = ImageDraw.Draw(img)
    for s in objects:
        _draw_shape(d, s, w, h, rng)
    fmt = "PNG" if rng.random() < 0.4 else "JPEG"
    ext = "png" if fmt == "PNG" else "jpg"
    rel = f"{split}/{index // 100:02d}/scene_{index:05d}.{ext}"
    return Scene(rel, split, w, h, bg_name, texture, objects), img, fmt


# --------------------------------------------------------------------------- conversations
def _questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, short answer, kind) about one scene; only unambiguous ones."""
    objs = scene.objects
    out = []
    n = len(objs)
    out.append(("How many shapes are in the image?", str(n), "count"))
    for s in objs:
        if sum(o.kind == s.kind for o in objs) == 1:
            out.append((f"What colour is the {s.kind}?", s.colour, "colour"))
            out.append((f"Where is the {s.kind}?", s.position, "position"))
        if sum(o.colour == s.colour for o in objs) == 1:
            out.append((f"What shape is the {s.colour} object?", s.kind, "shape"))
    absent = [c for c in COLOURS if all(o.colour != c for o in objs)]
    s = objs[int(rng.integers(n))]
    if rng.random() < 0.5:
        out.append((f"Is there {article(s.colour)} {s.colour} {s.kind} in the image?", "yes", "yes_no"))
    else:
        c = absent[int(rng.integers(len(absent)))]
        out.append((f"Is there {article(c)} {c} {s.kind} in the image?", "no", "yes_no"))
    return out


def _pretrain_record(scene: Scene) -> dict:
    return {
        "id": Path(scene.image).stem,
        "image": scene.image,
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": scene.caption}],
    }


def _sft_record(scene: Scene, rng: np.random.Generator) -> dict:
    qs = _questions(scene, rng)
    turns = [qs[i] for i in rng.choice(len(qs), min(len(qs), int(rng.integers(1, 4))), replace=False)]
    conv = []
    for i, (q, a, _) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a[0].upper() + a[1:] + "."})
    return {"id": Path(scene.image).stem + "_qa", "image": scene.image, "conversations": conv}


def _vqa_items(scene: Scene, rng: np.random.Generator) -> list[dict]:
    qs = _questions(scene, rng)
    base = Path(scene.image).stem
    items: list[dict] = []
    yn = [q for q in qs if q[2] == "yes_no"][0]
    items.append({"id": f"{base}_yn", "image": scene.image, "question": yn[0], "answer": yn[1], "type": "yes_no"})
    mc = [q for q in qs if q[2] in ("colour", "shape")]
    if mc:
        q, a, kind = mc[int(rng.integers(len(mc)))]
        pool = [c for c in (COLOURS if kind == "colour" else KINDS) if c != a]
        options = [pool[i] for i in rng.choice(len(pool), 3, replace=False)] + [a]
        options = [options[i] for i in rng.permutation(4)]
        items.append(
            {
                "id": f"{base}_mc",
                "image": scene.image,
                "question": q,
                "options": options,
                "answer": "ABCD"[options.index(a)],
                "type": "multiple_choice",
            }
        )
    cnt = [q for q in qs if q[2] == "count"][0]
    items.append(
        {
            "id": f"{base}_count",
            "image": scene.image,
            "question": cnt[0] + " Answer with a number.",
            "answer": cnt[1],
            "type": "short",
        }
    )
    return items


# --------------------------------------------------------------------------- corpus
@dataclass
class CorpusSummary:
    out: str
    seed: int
    train_images: int
    heldout_images: int
    pretrain: int
    sft: int
    text_only: int
    vqa: int


def _write_json(path: Path, obj, lines: bool = False) -> None:
    atomic_write(path, "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=1))


def make_corpus(
    out: str | os.PathLike, n: int = 600, seed: int = 0, heldout_fraction: float = 0.1, progress: bool = True
) -> CorpusSummary:
    """Write the sample corpus (see module docstring); returns its counts."""
    from tqdm import tqdm

    if n < 2:
        raise ValueError("need n >= 2 (at least one train and one held-out image)")
    out = Path(out)
    n_held = min(n - 1, max(1, round(n * heldout_fraction)))
    scenes: list[Scene] = []
    for i in tqdm(range(n), desc="scenes", unit="img", disable=not progress, leave=False):
        split = "heldout" if i >= n - n_held else "train"
        scene, img, fmt = make_scene(seed, i, split)
        path = out / "images" / scene.image
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            img.save(tmp, format=fmt, **({"quality": int(75 + (i * 7) % 21)} if fmt == "JPEG" else {}))
        scenes.append(scene)
    rng = np.random.default_rng([seed, 1 << 20])
    train = [s for s in scenes if s.split == "train"]
    held = [s for s in scenes if s.split == "heldout"]
    _write_json(
        out / "captions.jsonl",
        [
            dict(
                image=s.image,
                split=s.split,
                width=s.width,
                height=s.height,
                caption=s.caption,
                background=s.background,
                texture=s.texture,
                objects=[asdict(o) for o in s.objects],
            )
            for s in scenes
        ],
        lines=True,
    )
    sft = [_sft_record(s, rng) for s in train]
    n_text = max(1, len(train) // 20)
    for j in range(n_text):
        q, a = TEXT_ONLY[j % len(TEXT_ONLY)]
        sft.insert(
            int(rng.integers(len(sft) + 1)),
            {"id": f"text_{j:04d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        )
    _write_json(out / "llava_pretrain.json", [_pretrain_record(s) for s in train])
    _write_json(out / "llava_sft.json", sft)
    _write_json(out / "heldout_pretrain.json", [_pretrain_record(s) for s in held])
    _write_json(out / "heldout_sft.json", [_sft_record(s, rng) for s in held])
    vqa = [item for s in held for item in _vqa_items(s, rng)]
    _write_json(out / "vqa_bench.jsonl", vqa, lines=True)
    summary = CorpusSummary(
        out=str(out),
        seed=seed,
        train_images=len(train),
        heldout_images=len(held),
        pretrain=len(train),
        sft=len(sft),
        text_only=n_text,
        vqa=len(vqa),
    )
    _write_json(out / "corpus.json", {k: v for k, v in asdict(summary).items() if k != "out"})  # relocatable
    return summary


def main(argv: list[str] | None = None) -> int:
    from asvr.core.help_text import plain

    p = argparse.ArgumentParser(prog="python -m asvr.demo.sample_corpus", description=plain(__doc__.splitlines()[0]))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=600, help="number of images (train + held-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    args = p.parse_args(argv)

    def run() -> None:
        print(json.dumps(asdict(make_corpus(args.out, args.n, args.seed, args.heldout_fraction))))

    return run_guarded("sample_corpus", None, run, (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
