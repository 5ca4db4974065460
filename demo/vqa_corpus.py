"""A procedural visual-QA corpus whose answers need the image (the ASVR experiment and ``make demo``).

``python -m asvr.demo.vqa_corpus --out DIR --train 600 --heldout 60 --free 300 --seed 0`` writes::

    DIR/images/{train,heldout,free}/NN/scene_XXXXX.png   224 x 224 PIL-drawn scenes
    DIR/scenes.jsonl          {"image", "split", "objects": [{"colour", "shape", "size", "row", "col"}], "caption"}
    DIR/llava_pretrain.json   LLaVA plain style: human "<image>" / gpt caption                     (train)
    DIR/llava_sft.json        LLaVA, one question per turn, LLaVA-1.5's answer-format instructions  (train)
    DIR/heldout_sft.json      the same on the held-out images (held-out losses, per-depth visual accuracy)
    DIR/vqa_bench.jsonl       {"id", "image", "question", "answer", "type", "category", "chance", ["options"]}
                              on the held-out images, about their unseen colour-shape pair (what
                              ``asvr-eval bench`` reads): compositional generalisation
    DIR/vqa_bench_seen.jsonl  the same images, about their other objects (pairs seen in training):
                              generalisation to new scenes
    DIR/corpus.json           counts, seed, held-out colour-shape pairs

``free`` images have no conversation at all: caption-free samples once
tokenized into the same shards (``asvr-train --caption-free-ratio``).

A scene holds 2-4 objects with distinct colours (6) and distinct shapes (4),
each small / medium / large, in distinct cells of a 3 x 3 grid, on a plain
background of one of four greys.  The question categories are ``colour``,
``shape``, ``count``, ``position`` (relative: left / right / above / below
of another object) and ``size``; every category is asked in the three forms
(``yes_no``, ``multiple_choice`` with 4 options or 3 for size and count, ``short``: one
word), planned so that categories x forms are balanced exactly (``QuestionPlan``),
yes/no answers alternate and the right option's letter cycles through the options.  Relative
positions are asked only of objects in the same row or column (one right
answer); every scene has such a pair.

Held-out combinations: one colour per shape (4 of the 24 colour-shape pairs)
is drawn from the seed and never appears in a train or free image; every
held-out image holds at least one such object; the colour, shape, size and
position questions of ``vqa_bench.jsonl`` are about that object, those of
``vqa_bench_seen.jsonl`` about the image's other objects (new scenes of known
pairs: a model that reads the image at all gets these right before it
composes colour and shape it never saw together).  Chance level per item is in
``chance`` (1/2 yes/no, 1/options, 1/answer-vocabulary for short answers).
Everything is drawn from ``default_rng([seed, split, index])``: the corpus is
deterministic and an image does not depend on the other counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.errors import run_guarded
from asvr.demo.vqa_scenes import (  # noqa: F401 - the vocabulary stays importable from here
    CATEGORIES,
    CELL_NAMES,
    COLOURS,
    COUNTS,
    DESCRIBE,
    FORMS,
    IMAGE_SIDE,
    INSTRUCTION,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Obj,
    Scene,
    draw_scene,
    heldout_pairs,
    make_scene,
)


# --------------------------------------------------------------------------- questions
@dataclass
class Question:
    category: str
    form: str
    question: str
    answer: str
    """yes/no, the option text (multiple choice) or the short answer."""
    options: list[str] | None
    chance: float


def _relation(a: Obj, b: Obj) -> list[str]:
    rel = []
    if a.col != b.col:
        rel.append("left" if a.col < b.col else "right")
    if a.row != b.row:
        rel.append("above" if a.row < b.row else "below")
    return rel


_RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _ask(
    category: str, form: str, scene: Scene, rng: np.random.Generator, truth: bool, subject: str = "any"
) -> Question:
    """One question of ``category`` in ``form`` (yes/no answer = ``truth``) about an object drawn
    from ``subject``: ``any`` object, the ``unseen`` pair (a held-out scene's first object) or a
    ``seen`` one (any other)."""
    objs = scene.objects
    pool = {"any": objs, "unseen": objs[:1], "seen": objs[1:]}[subject]
    o = pool[int(rng.integers(len(pool)))]
    if category == "colour":
        vocab, gold, stem = list(COLOURS), o.colour, f"What colour is the {o.shape}?"
        yn = f"Is the {o.shape} {{}}?"
    elif category == "shape":
        vocab, gold, stem = list(SHAPES), o.shape, f"What shape is the {o.colour} object?"
        yn = f"Is the {o.colour} object a {{}}?"
    elif category == "count":
        vocab, gold, stem = list(COUNTS), str(len(objs)), "How many objects are there?"
        yn = "Are there {} objects?"
    elif category == "size":
        vocab, gold, stem = list(SIZES), o.size, f"What size is the {o.name}?"
        yn = f"Is the {o.name} {{}}?"
    else:  # position of o relative to an object in its row or column: one right answer
        if not any(len(_relation(o, b)) == 1 for b in objs if b is not o):
            o = objs[1] if subject == "seen" else objs[0]  # the first two objects share a row or column
        partners = [b for b in objs if b is not o and len(_relation(o, b)) == 1]
        b = partners[int(rng.integers(len(partners)))]
        vocab, gold = list(RELATIONS), _relation(o, b)[0]
        stem = f"Where is the {o.name} relative to the {b.name}?"
        yn = f"Is the {o.name} {{}} the {b.name}?"
    if form == "yes_no":
        word = gold if truth else [v for v in vocab if v != gold][int(rng.integers(len(vocab) - 1))]
        word = _RELATION_WORDS[word] if category == "position" else word
        return Question(category, form, yn.format(word), "yes" if truth else "no", None, 0.5)
    if form == "multiple_choice":
        wrong = [v for v in vocab if v != gold]
        options = [gold] + [wrong[int(i)] for i in rng.permutation(len(wrong))[:3]]
        return Question(category, form, stem, gold, options, 1 / len(options))
    if category == "position":
        stem += " Left, right, above or below?"
    return Question(category, form, stem, gold, None, 1 / len(vocab))


def _place_options(q: Question, letter: int) -> tuple[list[str], str]:
    """Options with the right one at ``letter % len`` (the rest in drawn order) -> (options, letter)."""
    assert q.options is not None, "only multiple-choice questions have options"
    opts = [o for o in q.options if o != q.answer]
    pos = letter % len(q.options)
    opts.insert(pos, q.answer)
    return opts, "ABCD"[pos]


class QuestionPlan:
    """Which questions each image gets, balanced exactly over every block of five images.

    In a block, image ``i`` gets for its ``j``-th question the form ``FORMS[j % 3]`` and the
    category ``perm[(i + j) % 5]`` (``perm`` drawn per block): each image asks distinct
    categories (no turn gives away another's answer), and with 3 or 6 questions per image
    every category x form occurs equally often.  The turns of an image are shuffled, so any
    question type can come first (what a one-question benchmark asks).  Yes/no truths
    alternate per category; the right option's letter cycles per number of options."""

    def __init__(self, rng: np.random.Generator, per_image: int, subject: str = "any"):
        if not 1 <= per_image <= len(CATEGORIES):
            raise ValueError(f"questions per image must be 1..{len(CATEGORIES)}, got {per_image}")
        self.rng = rng
        self.per_image = per_image
        self.subject = subject
        self.n = 0
        self.perm = list(range(len(CATEGORIES)))
        self.truth = {c: 0 for c in CATEGORIES}
        self.letter: dict[int, int] = {}

    def for_image(self, scene: Scene) -> list[tuple[Question, str]]:
        """-> [(question, gold for the bench: yes/no, the option letter or the short answer)]."""
        i = self.n % len(CATEGORIES)
        if i == 0:
            self.perm = self.rng.permutation(len(CATEGORIES)).tolist()
        self.n += 1
        slots = [
            (CATEGORIES[self.perm[(i + j) % len(CATEGORIES)]], FORMS[j % len(FORMS)]) for j in range(self.per_image)
        ]
        out = []
        for k in self.rng.permutation(len(slots)).tolist():
            cat, form = slots[k]
            q = _ask(cat, form, scene, self.rng, truth=self.truth[cat] % 2 == 0, subject=self.subject)
            if form == "yes_no":
                self.truth[cat] += 1
                out.append((q, q.answer))
            elif form == "multiple_choice":
                assert q.options is not None
                n = len(q.options)
                q.options, letter = _place_options(q, self.letter.get(n, 0))
                self.letter[n] = self.letter.get(n, 0) + 1
                out.append((q, letter))
            else:
                out.append((q, q.answer))
        return out


def prompt(q: Question) -> str:
    """The user turn after the image, laid out as ``asvr-eval bench`` lays it out (llava instructions)."""
    parts = [q.question]
    if q.options:
        parts += [f"{'ABCD'[i]}. {o}" for i, o in enumerate(q.options)]
    return "\n".join(parts + [INSTRUCTION[q.form]])


def _reply(q: Question, gold: str) -> str:
    return gold if q.form == "multiple_choice" else gold[0].upper() + gold[1:]


# --------------------------------------------------------------------------- corpus
@dataclass
class VQACorpusSummary:
    out: str
    seed: int
    train_images: int
    heldout_images: int
    free_images: int
    sft_turns: int
    vqa: int
    heldout_pairs: list[str]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def _draw_scenes(out: Path, seed: int, counts: dict[str, int], held: list, progress: bool) -> list[Scene]:
    """Every scene of every split, its PNG written under ``out/images``."""
    from tqdm import tqdm

    scenes: list[Scene] = []
    jobs = [(s, i) for s, n in counts.items() for i in range(n)]
    for split, i in tqdm(jobs, desc="scenes", unit="img", disable=not progress, leave=False):
        scene = make_scene(seed, split, i, held)
        path = out / "images" / scene.image
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            draw_scene(scene, seed, i).save(tmp, format="PNG")
        scenes.append(scene)
    return scenes


def _conversations(scenes: list[Scene], split: str, plan: QuestionPlan, describe: bool) -> list[dict]:
    """One LLaVA SFT record per scene: the planned questions, then (``describe``) the caption."""
    recs = []
    for s in scenes:
        conv = []
        for t, (q, gold) in enumerate(plan.for_image(s)):
            conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + prompt(q)})
            conv.append({"from": "gpt", "value": _reply(q, gold)})
        if describe:  # last, so no question can copy its answer from the description
            conv += [{"from": "human", "value": DESCRIBE}, {"from": "gpt", "value": s.caption}]
        recs.append({"id": Path(s.image).stem + f"_{split}_qa", "image": s.image, "conversations": conv})
    return recs


def _bench(scenes: list[Scene], plan: QuestionPlan) -> list[dict]:
    """The ``asvr-eval bench`` items of the held-out scenes."""
    items = []
    for s in scenes:
        for t, (q, gold) in enumerate(plan.for_image(s)):
            item = {
                "id": f"{Path(s.image).stem}_{t}",
                "image": s.image,
                "question": q.question,
                "answer": gold,
                "type": q.form,
                "category": q.category,
                "chance": round(q.chance, 6),
            }
            if q.options:
                item["options"] = q.options
            items.append(item)
    return items


def _captions(scenes: list[Scene]) -> list[dict]:
    """LLaVA plain-style pretraining records: human ``<image>`` / gpt caption."""
    return [
        {
            "id": Path(s.image).stem + "_cap",
            "image": s.image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": s.caption}],
        }
        for s in scenes
    ]


def _scene_lines(scenes: list[Scene]) -> str:
    return "".join(
        json.dumps(
            {"image": s.image, "split": s.split, "caption": s.caption, "objects": [asdict(o) for o in s.objects]}
        )
        + "\n"
        for s in scenes
    )


def make_vqa_corpus(
    out: str | os.PathLike,
    train: int = 600,
    heldout: int = 60,
    free: int = 0,
    seed: int = 0,
    questions_per_image: int = 3,
    bench_per_image: int = 3,
    describe: bool = True,
    progress: bool = True,
) -> VQACorpusSummary:
    """Write the corpus (see module doc); returns its counts.  ``describe``: each SFT conversation
    ends with "Describe the image briefly." and the caption (dense grounded supervision: a tiny
    LLM learns to read the image from ~15 caption tokens an image far sooner than from 3
    one-word answers)."""
    if train < 1 or heldout < 1 or free < 0:
        raise ValueError("need train >= 1, heldout >= 1 and free >= 0")
    out = Path(out)
    held = heldout_pairs(seed)
    scenes = _draw_scenes(out, seed, {"train": train, "heldout": heldout, "free": free}, held, progress)
    by_split = {s: [x for x in scenes if x.split == s] for s in SPLITS}

    def plan(stream: int, per_image: int, subject: str = "any") -> QuestionPlan:
        return QuestionPlan(np.random.default_rng([seed, stream]), per_image, subject)

    sft = _conversations(by_split["train"], "train", plan(10, questions_per_image), describe)
    held_sft = _conversations(by_split["heldout"], "heldout", plan(11, questions_per_image), describe)
    _write(out / "scenes.jsonl", _scene_lines(scenes))
    _write(out / "llava_pretrain.json", json.dumps(_captions(by_split["train"]), indent=1))
    _write(out / "llava_sft.json", json.dumps(sft, indent=1))
    _write(out / "heldout_sft.json", json.dumps(held_sft, indent=1))
    unseen = _bench(by_split["heldout"], plan(12, bench_per_image, "unseen"))
    seen = _bench(by_split["heldout"], plan(13, bench_per_image, "seen"))
    _write(out / "vqa_bench.jsonl", "".join(json.dumps(b) + "\n" for b in unseen))
    _write(out / "vqa_bench_seen.jsonl", "".join(json.dumps(b) + "\n" for b in seen))
    summary = VQACorpusSummary(
        out=str(out),
        seed=seed,
        train_images=train,
        heldout_images=heldout,
        free_images=free,
        sft_turns=train * questions_per_image,
        vqa=len(unseen),
        heldout_pairs=[f"{c} {s}" for c, s in held],
    )
    _write(out / "corpus.json", json.dumps({k: v for k, v in asdict(summary).items() if k != "out"}, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asvr.demo.vqa_corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=600, help="train images (captions + questions)")
    p.add_argument("--heldout", type=int, default=60, help="held-out images (unseen colour-shape pairs; the bench)")
    p.add_argument("--free", type=int, default=0, help="caption-free images (no conversation)")
    p.add_argument("--questions", type=int, default=3, help="SFT questions per train image")
    p.add_argument("--bench-questions", type=int, default=3, help="bench questions per held-out image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    def run() -> None:
        s = make_vqa_corpus(
            a.out, a.train, a.heldout, a.free, a.seed, a.questions, a.bench_questions, progress=not a.quiet
        )
        print(json.dumps(asdict(s)))

    return run_guarded("vqa_corpus", None, run, (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
