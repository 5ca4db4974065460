"""What can be read from the vision tower's features of the procedural VQA scenes?  A linear probe.

``python -m bench.feature_probe CORPUS TOWER [--layer N] [--train 1500] [--heldout 200]``

``CORPUS`` is a ``asvr.demo.vqa_corpus`` folder, ``TOWER`` anything ``--vision-tower``
accepts (a tokenizer artifact or a Hugging Face vision folder).  The tokens of each image are
averaged per cell of the scenes' 3 x 3 layout (a token belongs to the cell its centre falls
in) and one linear classifier, shared by all cells, predicts the colour and the shape of the
object in the cell (or "empty").  Trained on the train images, scored on the held-out ones:
all their objects, and the object of the colour-shape pair no training image shows.

This is the ceiling of "reading the image" for the ASVR miniature (``bench/asvr_effect.py``):
what a language model could extract with one linear map per token.  Measured on the
EfficientNet-Lite0 default (1500 train, 200 held-out images, 30 epochs; 2026-11-26, by this
probe's first version on the experiment's 4000-scene corpus, whose held-out scenes could then
hold a second unseen pair):

=================  ========  ========  =====================  ====================
features           held-out  held-out  unseen pair: colour    unseen pair: shape
                   colour    shape     (chance 16.7 %)        (chance 25 %)
=================  ========  ========  =====================  ====================
last block (-1)    73.2 %    95.5 %    52.5 %                 93.0 %
block 14 (192-d)   78.8 %    97.2 %    63.5 %                 94.5 %
block 12 (192-d)   82.3 %    97.4 %    66.5 %                 94.0 %
=================  ========  ========  =====================  ====================

Shape survives to the last block; colour fades (ImageNet features are partly colour-invariant),
most of all for a colour never seen on that shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ProbeResult:
    features: str
    tokens: list[int]
    heldout_colour: float
    heldout_shape: float
    unseen_colour: float
    unseen_shape: float
    train_colour: float


def cell_pooling(grid: int):
    """[9, grid*grid] averaging matrix: token -> the 3 x 3 cell its centre falls in."""
    import torch

    cell = [int(3 * (i + 0.5) / grid) * 3 + int(3 * (j + 0.5) / grid) for i in range(grid) for j in range(grid)]
    a = torch.zeros(9, grid * grid)
    for t, c in enumerate(cell):
        a[c, t] = 1.0
    return a / a.sum(1, keepdim=True)


def labels(scenes: list[dict]):
    """Per image and cell: colour index (6 = empty) and shape index (4 = empty)."""
    import torch

    from asvr.demo.vqa_corpus import COLOURS, SHAPES

    colour = torch.full((len(scenes), 9), len(COLOURS))
    shape = torch.full((len(scenes), 9), len(SHAPES))
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            colour[i, 3 * o["row"] + o["col"]] = list(COLOURS).index(o["colour"])
            shape[i, 3 * o["row"] + o["col"]] = SHAPES.index(o["shape"])
    return colour, shape


def probe(corpus: str, tower_path: str, layer: int | None, n_train: int, n_heldout: int, epochs: int = 30):
    import torch
    from tqdm import tqdm

    from asvr.train.model.vision_tower import open_vision_tower

    torch.manual_seed(0)
    tower = open_vision_tower(tower_path, layer=layer)
    scenes = [json.loads(x) for x in (Path(corpus) / "scenes.jsonl").read_text().splitlines()]
    train = [s for s in scenes if s["split"] == "train"][:n_train]
    held = [s for s in scenes if s["split"] == "heldout"][:n_heldout]

    def features(ss):
        out = []
        for i in tqdm(range(0, len(ss), 32), desc="features", leave=False):
            paths = [Path(corpus) / "images" / s["image"] for s in ss[i : i + 32]]
            out.append(tower.features(tower.preprocess_images(paths, "square")).float())
        return torch.cat(out)

    xtr, xhe = features(train), features(held)
    n_tok, dim = xtr.shape[1:]
    pool = cell_pooling(int(round(n_tok**0.5)))
    mu, sd = xtr.mean((0, 1)), xtr.std((0, 1)) + 1e-5
    ctr, str_ = labels(train)
    che, she = labels(held)
    n_col, n_shape = int(ctr.max()) + 1, int(str_.max()) + 1
    lin = torch.nn.Linear(dim, n_col + n_shape)
    opt = torch.optim.Adam(lin.parameters(), 1e-3)

    def logits(x):
        return lin(torch.einsum("ct,ntd->ncd", pool, (x - mu) / sd))

    for _ in range(epochs):
        for b in torch.randperm(len(xtr)).split(64):
            y = logits(xtr[b])
            loss = torch.nn.functional.cross_entropy(
                y[..., :n_col].reshape(-1, n_col), ctr[b].flatten()
            ) + torch.nn.functional.cross_entropy(y[..., n_col:].reshape(-1, n_shape), str_[b].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        yh, yt = logits(xhe), logits(xtr)
    occupied, occupied_tr = che < n_col - 1, ctr < n_col - 1
    first = torch.tensor([3 * s["objects"][0]["row"] + s["objects"][0]["col"] for s in held])
    rows = torch.arange(len(held))
    return ProbeResult(
        features=f"{tower_path} layer {layer if layer is not None else 'default'}",
        tokens=[int(n_tok), int(dim)],
        heldout_colour=float((yh[..., :n_col].argmax(-1) == che)[occupied].float().mean()),
        heldout_shape=float((yh[..., n_col:].argmax(-1) == she)[occupied].float().mean()),
        unseen_colour=float((yh[rows, first, :n_col].argmax(-1) == che[rows, first]).float().mean()),
        unseen_shape=float((yh[rows, first, n_col:].argmax(-1) == she[rows, first]).float().mean()),
        train_colour=float((yt[..., :n_col].argmax(-1) == ctr)[occupied_tr].float().mean()),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.feature_probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("corpus", help="a vqa_corpus folder (scenes.jsonl, images/)")
    ap.add_argument("tower", help="a tokenizer artifact or a Hugging Face vision folder")
    ap.add_argument("--layer", type=int, help="feature layer (default: the tower's own)")
    ap.add_argument("--train", type=int, default=1500, help="train images probed (default %(default)s)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out images scored (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args(argv)
    if not (Path(a.corpus) / "scenes.jsonl").is_file():
        print(f"feature_probe: error: {a.corpus} has no scenes.jsonl (not a vqa_corpus folder)", file=sys.stderr)
        return 2
    r = probe(a.corpus, a.tower, a.layer, a.train, a.heldout, a.epochs)
    print(json.dumps(asdict(r), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
