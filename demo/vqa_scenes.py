"""The scenes of the procedural VQA corpus (:mod:`asvr.demo.vqa_corpus`): the vocabulary, the
held-out colour-shape pairs, one scene drawn from ``default_rng([seed, split, index])`` and its
PIL drawing.  Split from the corpus writer so the questions and the files they go to read apart
from how a scene looks (issue 21: files under 400 lines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (30, 70, 210),
    "yellow": (245, 215, 40),
    "purple": (130, 50, 170),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.11, "medium": 0.16, "large": 0.22}  # radius / image side
BACKGROUNDS = ((120, 120, 120), (90, 95, 100), (150, 145, 140), (70, 70, 70))
CATEGORIES = ("colour", "shape", "count", "position", "size")
FORMS = ("yes_no", "multiple_choice", "short")
RELATIONS = ("left", "right", "above", "below")
COUNTS = ("2", "3", "4")
SPLITS = {"train": 0, "heldout": 1, "free": 2}
INSTRUCTION = {
    "yes_no": "Answer the question using a single word or phrase.",
    "short": "Answer the question using a single word or phrase.",
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
}
"""LLaVA-1.5's answer-format prompts, as ``asvr-eval bench --instructions llava`` appends them."""
IMAGE_SIDE = 224
CELL_NAMES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the middle", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
DESCRIBE = "Describe the image briefly."


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: str
    split: str
    objects: list[Obj]

    @property
    def caption(self) -> str:
        parts = [f"a {o.size} {o.name} {CELL_NAMES[o.row][o.col]}" for o in self.objects]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return body[0].upper() + body[1:] + "."


def heldout_pairs(seed: int) -> list[tuple[str, str]]:
    """One (colour, shape) per shape that the train and free images never show."""
    rng = np.random.default_rng([seed, 99])
    colours = list(COLOURS)
    picked = rng.permutation(len(colours))[: len(SHAPES)]
    return [(colours[int(c)], s) for c, s in zip(picked, SHAPES)]


# --------------------------------------------------------------------------- scenes
def make_scene(seed: int, split: str, index: int, held: list[tuple[str, str]]) -> Scene:
    """Objects of one scene; a held-out scene contains exactly one held-out pair (its first object), others none."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = int(rng.integers(2, 5))
    held_set = set(held)
    while True:
        colours = [list(COLOURS)[int(i)] for i in rng.permutation(len(COLOURS))]
        shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))]
        if split == "heldout":  # the held-out object first; the others distinct from it
            c, s = held[int(rng.integers(len(held)))]
            colours, shapes = [c] + [x for x in colours if x != c], [s] + [x for x in shapes if x != s]
        colours, shapes = colours[:n], shapes[:n]
        others = zip(colours[1:], shapes[1:]) if split == "heldout" else zip(colours, shapes)
        if not any((c, s) in held_set for c, s in others):  # held-out scenes: exactly one unseen pair
            break
    # the second object shares a row or a column with the first: every scene has a pair whose
    # relative position is one word (left / right / above / below), never a diagonal
    first = int(rng.integers(9))
    aligned = [k for k in range(9) if k != first and (k // 3 == first // 3 or k % 3 == first % 3)]
    second = aligned[int(rng.integers(len(aligned)))]
    rest = [k for k in rng.permutation(9).tolist() if k not in (first, second)]
    cells = [first, second, *rest][:n]
    objs = [
        Obj(c, s, list(SIZES)[int(rng.integers(3))], int(k) // 3, int(k) % 3) for c, s, k in zip(colours, shapes, cells)
    ]
    return Scene(f"{split}/{index // 100:02d}/scene_{index:05d}.png", split, objs)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
    return [
        (
            cx + (r if i % 2 == 0 else 0.45 * r) * np.cos(-np.pi / 2 + i * np.pi / 5),
            cy + (r if i % 2 == 0 else 0.45 * r) * np.sin(-np.pi / 2 + i * np.pi / 5),
        )
        for i in range(10)
    ]


def draw_scene(scene: Scene, seed: int, index: int, side: int = IMAGE_SIDE) -> Image.Image:
    rng = np.random.default_rng([seed, SPLITS[scene.split], index, 1])
    img = Image.new("RGB", (side, side), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        cx = (o.col + 0.5 + rng.uniform(-0.08, 0.08)) * side / 3
        cy = (o.row + 0.5 + rng.uniform(-0.08, 0.08)) * side / 3
        r = SIZES[o.size] * side * rng.uniform(0.95, 1.05)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        else:
            d.polygon(_polygon(o.shape, cx, cy, r * (1.15 if o.shape == "star" else 1.0)), fill=fill)
    return img
