"""Contact sheets: a grid of captioned thumbnails, optionally with boxes outlined.

Each image is letterboxed into a ``tile x tile`` square (aspect ratio kept), and
its boxes, given in the image's own pixel coordinates, go through the same
scale and offset, so callers never think about thumbnails.  PIL only (no
matplotlib): a 64-tile sheet draws in ~50 ms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from asvr.core.atomic import atomic_path

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in the tile's source image pixels


@dataclass
class Tile:
    image: Image.Image | None
    """None draws a grey 'missing' tile (the key has no file under --images)."""
    caption: str
    boxes: list[Box] = field(default_factory=list)
    highlight: bool = False
    """a coloured frame (the query of a search sheet)."""


@dataclass(frozen=True)
class SheetLayout:
    tile: int = 160
    cols: int = 6
    pad: int = 6
    caption_lines: int = 2
    line_h: int = 12
    title_h: int = 20

    def __post_init__(self):
        if self.tile < 16 or self.cols < 1:
            raise ValueError(f"sheet tile must be >= 16 px and cols >= 1, got tile={self.tile} cols={self.cols}")

    @property
    def cell_h(self) -> int:
        return self.tile + self.caption_lines * self.line_h + self.pad

    def size(self, n: int) -> tuple[int, int]:
        """(width, height) of a sheet with ``n`` tiles."""
        cols = max(1, min(self.cols, n))
        rows = max(1, -(-n // cols))
        return cols * (self.tile + self.pad) + self.pad, self.title_h + rows * self.cell_h + self.pad


def _fit(img: Image.Image, tile: int) -> tuple[Image.Image, float, int, int]:
    """Letterbox into tile x tile: (thumbnail, scale, x offset, y offset)."""
    w, h = img.size
    s = tile / max(w, h)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    return img.convert("RGB").resize((tw, th), Image.Resampling.BILINEAR), s, (tile - tw) // 2, (tile - th) // 2


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]  # keep the end: file names differ at the end more than at the start
    return "…" + text


def draw_sheet(tiles: list[Tile], layout: SheetLayout = SheetLayout(), title: str = "") -> Image.Image:
    W, H = layout.size(len(tiles))
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((layout.pad, 4), _clip_text(draw, title, font, W - 2 * layout.pad), fill=(0, 0, 0), font=font)
    cols = max(1, min(layout.cols, len(tiles)))
    t = layout.tile
    for i, tile in enumerate(tiles):
        x = layout.pad + (i % cols) * (t + layout.pad)
        y = layout.title_h + (i // cols) * layout.cell_h
        draw.rectangle([x, y, x + t - 1, y + t - 1], fill=(236, 236, 236))
        if tile.image is None:
            draw.text((x + 8, y + t // 2 - 6), "missing", fill=(120, 120, 120), font=font)
        else:
            thumb, s, ox, oy = _fit(tile.image, t)
            sheet.paste(thumb, (x + ox, y + oy))
            for x0, y0, x1, y1 in tile.boxes:
                draw.rectangle(
                    [x + ox + x0 * s, y + oy + y0 * s, x + ox + x1 * s - 1, y + oy + y1 * s - 1],
                    outline=(255, 40, 40),
                    width=2,
                )
        if tile.highlight:
            draw.rectangle([x - 3, y - 3, x + t + 2, y + t + 2], outline=(20, 120, 255), width=3)
        lines = tile.caption.split("\n")[: layout.caption_lines]
        for j, line in enumerate(lines):
            draw.text((x, y + t + 2 + j * layout.line_h), _clip_text(draw, line, font, t), fill=(0, 0, 0), font=font)
    return sheet


def save_png(img: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Atomic PNG write (temp name in the same folder, then rename); ``text`` goes into PNG
    text chunks (e.g. ``{"Title": ...}``, readable as ``Image.open(path).text``)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return path


def load_image_under(root: str | os.PathLike | None, key: str) -> Image.Image | None:
    """The image a shard key names under ``root`` (folder inputs: key = relative path), or None."""
    if root is None:
        return None
    root = Path(root).resolve()
    p = (root / key).resolve()
    if root not in p.parents or not p.is_file():  # a key never escapes the root
        return None
    try:
        from asvr.tokenizer.preprocess import open_image

        return open_image(p.read_bytes())
    except (OSError, ValueError):
        return None
