"""What the codebook learned: usage per depth, dead and dominant codes, nearest
codes of a code, and the images and patches that use a code.

All statistics stream over the shards one at a time (one ``np.bincount`` per
depth per shard), so memory is one shard, whatever the corpus.

Patch boxes are drawn on the *original* image: grid cell ``(h, w)`` covers
``[w S/W, (w+1) S/W) x [h S/H, (h+1) S/H)`` of the ``S x S`` preprocessed view;
for ``square`` that view is the image stretched, so the box scales by
``W0/W, H0/H``; for ``pad`` the view is the image centred on a mean-colour
square of side ``max(W0, H0)`` (``expand2square``), so the box is mapped in
canvas pixels, shifted by the paste offset and clipped to the image; a cell
entirely in the padding has no box.  The cell is the patch's nominal
footprint: the encoder's receptive field is wider, and SigLIP's 27 patches of
14 px cover 378 of the 384 px (the last 6 px belong to no cell).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from asvr.core.shards import ShardError, codes_array, iter_shards, list_shards
from asvr.core.errors import AsvrError

Box = tuple[float, float, float, float]


class InspectError(AsvrError):
    pass


class ProgressBar(Protocol):
    """What the ``progress`` callbacks return (a ``tqdm`` bar does)."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> object: ...


# --------------------------------------------------------------------------- usage
@dataclass
class Usage:
    counts: np.ndarray
    """int64 ``[D, K]``: patches using code k at depth d."""
    images: int
    patches: int
    preprocess: str | None


def _each_shard(out, fingerprint: str, progress: Callable[[int], ProgressBar] | None) -> Iterator[tuple[Any, Any]]:
    """``(meta, table)`` of every shard of ``out``, a progress bar of shards advanced after each
    (closed at the end); a bad shard raises :class:`ShardError` (the callers' one-line error)."""
    bar = progress(len(list_shards(out))) if progress else None
    for _, meta, table in iter_shards(out, fingerprint):
        yield meta, table
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def usage_counts(
    out: str | os.PathLike,
    fingerprint: str,
    depth: int,
    codebook_size: int,
    progress: Callable[[int], ProgressBar] | None = None,
) -> Usage:
    counts = np.zeros((depth, codebook_size), np.int64)
    images = 0
    modes = set()
    try:
        for meta, table in _each_shard(out, fingerprint, progress):
            flat = codes_array(table, meta).reshape(-1, meta.depth)
            for d in range(depth):
                counts[d] += np.bincount(flat[:, d], minlength=codebook_size)[:codebook_size]
            images += table.num_rows
            modes.add(meta.preprocess)
    except ShardError as e:
        raise InspectError(str(e)) from None
    patches = int(counts[0].sum())
    return Usage(counts, images, patches, ",".join(sorted(modes)) or None)


@dataclass
class DepthSummary:
    depth: int
    used: int
    dead: int
    perplexity: float
    """exp(entropy of the usage distribution): the effective number of codes (K when uniform)."""
    top_share: float
    """share of patches taken by the 1% most used codes."""
    dominant: list[dict]
    """codes used more than ``dominant_factor`` times the uniform share, most used first."""
    dead_codes: list[int] = field(default_factory=list)


def summarize(usage: Usage, dominant_factor: float = 10.0, max_dominant: int = 50) -> list[DepthSummary]:
    out = []
    for d, c in enumerate(usage.counts):
        k = len(c)
        total = max(1, int(c.sum()))
        p = c / total
        nz = p[p > 0]
        ppl = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0
        order = np.argsort(-c, kind="stable")
        top = max(1, k // 100)
        dom = [int(i) for i in order if p[i] > dominant_factor / k][:max_dominant]
        out.append(
            DepthSummary(
                depth=d,
                used=int((c > 0).sum()),
                dead=int((c == 0).sum()),
                perplexity=round(ppl, 3),
                top_share=round(float(c[order[:top]].sum() / total), 5),
                dominant=[{"code": i, "count": int(c[i]), "share": round(float(p[i]), 6)} for i in dom],
                dead_codes=[int(i) for i in np.flatnonzero(c == 0)],
            )
        )
    return out


def usage_figure(usage: Usage, title: str = ""):
    """One row per depth: the counts sorted by rank (``StepPatch`` over ranks ``0..K``, floored
    at 0.5 for the log scale), the uniform share (dashed line), used/dead/perplexity in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, k = usage.counts.shape
    fig, axes = plt.subplots(d, 1, figsize=(8, 1.9 * d + 0.6), squeeze=False, sharex=True)
    uniform = usage.patches / k
    for i, (ax, c) in enumerate(zip(axes[:, 0], usage.counts)):
        s = np.sort(c)[::-1]
        ax.stairs(np.maximum(s, 0.5), np.arange(k + 1), baseline=0.5, fill=True, color="tab:blue", alpha=0.8)
        ax.axhline(max(uniform, 0.5), color="tab:red", lw=0.8, ls="--", label="uniform")
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(2.0, s[0] * 1.5))
        ppl = summarize(Usage(c[None], usage.images, usage.patches, usage.preprocess))[0].perplexity
        ax.set_title(f"depth {i}: used {(c > 0).sum()}/{k}, dead {(c == 0).sum()}, perplexity {ppl:.1f}", fontsize=9)
        ax.set_ylabel("patches")
    axes[-1, 0].set_xlabel("code rank (most used first)")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.suptitle(title or usage_title(usage), fontsize=10)
    fig.tight_layout()
    return fig


def usage_title(usage: Usage) -> str:
    return f"code usage over {usage.images} images ({usage.patches} patches)"


def plot_usage(usage: Usage, path: str | os.PathLike, title: str = "") -> Path:
    """:func:`usage_figure` as an atomic PNG (metadata ``Title``)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from asvr.tokenizer.codes.sheets import save_png

    fig = usage_figure(usage, title)
    fig.canvas.draw()
    rgba = fig.canvas.buffer_rgba()  # Agg's canvas
    img = Image.frombuffer("RGBA", fig.canvas.get_width_height(), rgba).convert("RGB")
    plt.close(fig)
    return save_png(img, path, text={"Title": title or usage_title(usage)})


# --------------------------------------------------------------------------- nearest codes
def nearest_codes(codebook: np.ndarray, code: int, n: int = 8) -> list[tuple[int, float]]:
    """The ``n`` codes nearest to ``code`` in one depth's codebook ``[K, C]`` (squared L2, faiss IndexFlatL2), itself excluded."""
    import faiss

    cb = np.ascontiguousarray(codebook, dtype=np.float32)
    index = faiss.IndexFlatL2(cb.shape[1])
    index.add(cb)
    dist, ids = index.search(cb[code : code + 1], min(n + 1, len(cb)))
    return [(int(i), float(dd)) for i, dd in zip(ids[0], dist[0]) if i >= 0 and i != code][:n]


# --------------------------------------------------------------------------- code uses
@dataclass(frozen=True)
class CodeUse:
    key: str
    positions: tuple[tuple[int, int], ...]
    """grid cells (h, w) whose code at the depth is the code."""


@dataclass(frozen=True)
class CodeUses:
    depth: int
    code: int
    images: int
    """images using the code at least once."""
    patches: int
    top: list[CodeUse]
    """up to ``max_images`` images using it most, ties by key."""
    preprocess: str


def find_code_uses(
    out: str | os.PathLike,
    fingerprint: str,
    depth: int,
    code: int,
    max_images: int = 16,
    progress: Callable[[int], ProgressBar] | None = None,
) -> CodeUses:
    heap: list[tuple[int, _Neg, np.ndarray]] = []  # min-heap on (count, -key order) keeps the best max_images
    images = patches = 0
    mode = ""
    try:
        for meta, table in _each_shard(out, fingerprint, progress):
            mode = meta.preprocess
            hit = codes_array(table, meta)[..., depth] == code  # [N, H, W]
            per = hit.reshape(len(hit), -1).sum(1)
            images += int((per > 0).sum())
            patches += int(per.sum())
            keys = table.column("key").to_pylist()
            for i in np.flatnonzero(per):
                item = (int(per[i]), _Neg(keys[i]), hit[i])
                if len(heap) < max_images:
                    heapq.heappush(heap, item)
                elif item[:2] > heap[0][:2]:
                    heapq.heapreplace(heap, item)
    except ShardError as e:
        raise InspectError(str(e)) from None
    top = sorted(heap, key=lambda t: (-t[0], t[1].s))
    uses = [CodeUse(t[1].s, tuple((int(h), int(w)) for h, w in zip(*np.nonzero(t[2])))) for t in top]
    return CodeUses(depth, code, images, patches, uses, mode)


class _Neg:
    """Reverses string order inside the heap so that, at equal counts, the smaller key wins."""

    __slots__ = ("s",)

    def __init__(self, s: str):
        self.s = s

    def __lt__(self, other: "_Neg") -> bool:
        return self.s > other.s

    def __gt__(self, other: "_Neg") -> bool:
        return self.s < other.s

    def __eq__(self, other) -> bool:
        return self.s == other.s


def patch_box(h: int, w: int, grid: tuple[int, int], size: tuple[int, int], mode: str) -> Box | None:
    """Grid cell ``(h, w)`` -> box in original image pixels ``(x0, y0, x1, y1)``; None if it is all padding."""
    from asvr.tokenizer.preprocess import preprocess_mode

    gh, gw = grid
    W0, H0 = size
    try:
        cw, ch, ox, oy = preprocess_mode(mode).placement(W0, H0)  # where the original lies on the canvas
    except ValueError:
        raise InspectError(f"unknown preprocess mode {mode!r}") from None
    x0, x1 = w * cw / gw - ox, (w + 1) * cw / gw - ox
    y0, y1 = h * ch / gh - oy, (h + 1) * ch / gh - oy
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(W0), x1), min(float(H0), y1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def code_sheet(
    uses: CodeUses, images_root: str | os.PathLike, grid: tuple[int, int], path: str | os.PathLike, tile: int = 160
) -> tuple[Path, int]:
    """Contact sheet of the images using a code, its patches outlined. Returns (path, missing images)."""
    from asvr.tokenizer.codes.sheets import SheetLayout, Tile, draw_sheet, load_image_under, save_png

    tiles = []
    for u in uses.top:
        img = load_image_under(images_root, u.key)
        boxes = []
        if img is not None:
            boxes = [b for h, w in u.positions if (b := patch_box(h, w, grid, img.size, uses.preprocess)) is not None]
        tiles.append(Tile(img, f"{len(u.positions)} patches\n{u.key}", boxes))
    title = (
        f"code {uses.depth}:{uses.code}: {uses.patches} patches in {uses.images} images "
        f"({uses.preprocess}); top {len(tiles)}"
    )
    sheet = draw_sheet(tiles or [Tile(None, "no image uses it")], SheetLayout(tile=tile), title=title)
    return save_png(sheet, path), sum(t.image is None for t in tiles)
