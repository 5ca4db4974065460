"""Image decoding and preprocessing, pixel-exact with the reference.

The reference (LLaVA/ASVR with a SigLIP image processor) does, per image:
``Image.open(...).convert('RGB')``; for ``pad`` it first pastes the image on a
square canvas of the mean colour (``expand2square``, background
``int(255 * mean)``); then a PIL bicubic resize to ``image_size x image_size``,
``x / 255``, ``(x - mean) / std``.  ``square`` skips the canvas (aspect ratio is
not kept).  We add what the reference forgets: EXIF orientation, and modes it
would mangle (16-bit greyscale is scaled to 8 bits instead of clipped; float
images in [0, 1] are scaled by 255 instead of becoming almost black, and float
images outside [0, 255] are refused).  The ``pad`` canvas is bounded by
``max_pixels`` like the decoded image (a 169-byte 30000x1 PNG would otherwise
ask for a 30000x30000 canvas, 2.7 GB); an image whose canvas fits is padded
exactly as before.  An image PIL cannot identify is reported with the reason
its format's decoder gives (``broken PNG file (bad header checksum in
b'IHDR')``), not PIL's generic "cannot identify".

The preprocess modes are a small registry of :class:`PreprocessMode` objects
(:func:`preprocess_mode` validates a name, once, for every caller): each owns its
geometry (the canvas the resize sees, where the original lies in it), so the
decode-memory estimate, the pipeline's uint8 resize, ``asvr-tokenizer inspect``'s
patch boxes and the LLaVA export ask the mode instead of comparing its name.  A
new mode is one :func:`register_preprocess_mode` call here (and its test): every
``--preprocess`` choice list reads :data:`PREPROCESS_MODES`.  :meth:`PreprocessConfig.for_encoder`
is the one place an encoder spec becomes a preprocessing config.

``fast_decode`` uses PIL's JPEG ``draft`` (DCT-domain downscaling by a power of
two, never below the target size): about 2x faster on large photos but the
pixels differ from a full decode, so it is opt-in.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from asvr.core.errors import AsvrError

from asvr.core.registry import Registry

if TYPE_CHECKING:
    from asvr.core.spec import EncoderSpec

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


class ImageError(AsvrError):
    """An image that cannot be used; ``stage`` is 'decode' or 'preprocess'."""

    def __init__(self, reason: str, stage: str = "decode"):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


# --------------------------------------------------------------------------- the modes
Placement = tuple[int, int, int, int]
"""``(canvas width, canvas height, x, y)``: the canvas the resize sees and where the original lies in it."""


@dataclass(frozen=True)
class PreprocessMode:
    """How an image becomes the square the encoder sees, before the resize to ``image_size``."""

    name: str
    help: str
    placement: Callable[[int, int], Placement]
    """original ``(width, height)`` -> its :data:`Placement` (decode memory, patch boxes)."""
    canvas: Callable[[Image.Image, tuple[int, int, int], int], Image.Image]
    """``(RGB image, background, max_pixels) -> the image to resize`` (:class:`ImageError` at stage preprocess)."""
    llava_do_pad: bool | None = None
    """transformers' ``LlavaImageProcessor(do_pad=...)`` that does the same, None: none does (no HF export)."""


MODES: Registry[PreprocessMode] = Registry("preprocess mode", "asvr.tokenizer", "preprocess_mode_")


def register_preprocess_mode(mode: PreprocessMode) -> PreprocessMode:
    return MODES.register(mode.name, mode)


def preprocess_mode(name: str) -> PreprocessMode:
    """The mode called ``name``; a ``ValueError`` naming the known ones otherwise (the one check)."""
    modes = MODES.all()
    if name not in modes:
        raise ValueError(f"preprocess mode must be one of {tuple(modes)}, got {name!r}")
    return modes[name]


def llava_mode(do_pad: bool) -> str:
    """The mode a LLaVA image processor with ``do_pad`` applies."""
    return next(m.name for m in MODES.all().values() if m.llava_do_pad is do_pad)


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"
    mode: str = "square"
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_decode: bool = False
    max_decode_bytes: int | None = None
    """Refuse, before decoding, an image whose decode is estimated to need more memory
    (:func:`decode_bytes`; None: no limit).  The pipeline sets its decode task's reservation."""

    def __post_init__(self):
        preprocess_mode(self.mode)
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    @classmethod
    def for_encoder(cls, encoder: "EncoderSpec", mode: str, **kw) -> "PreprocessConfig":
        """The encoder's image size, normalisation and resample with ``mode`` (``kw``: the other fields)."""
        return cls(
            image_size=encoder.image_size,
            mean=tuple(encoder.mean),
            std=tuple(encoder.std),
            resample=encoder.resample,
            mode=mode,
            **kw,
        )

    @property
    def preprocess_mode(self) -> PreprocessMode:
        return preprocess_mode(self.mode)

    @property
    def background(self) -> tuple[int, int, int]:
        r, g, b = (int(m * 255) for m in self.mean)
        return r, g, b


_CHUNK = 1 << 20
"""Pixels converted at a time by :func:`_scaled_to_l`: float64 temporaries of 8 MB, not 8 bytes
per pixel of the whole image (a 9000x9000 16-bit PNG took 2.5 GB converted at once, 0.4 GB so)."""
_SCALED_MODES = ("F", "I", "I;16", "I;16L", "I;16B", "I;16N")
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def decode_bytes(mode: str, width: int, height: int, pad: bool = False, layout: PreprocessMode | None = None) -> int:
    """Estimated peak bytes to decode an image of ``mode`` and bring it to RGB (and to the canvas of
    ``layout``; ``pad``: of the ``pad`` mode): the decoded image; for 16/32-bit and float modes its numpy copy and the 8-bit image
    (:func:`_scaled_to_l`); the RGB copy of any mode but RGB; the canvas.  The resized output is
    negligible.  bench/decode_memory.py compares it with the measured peak."""
    n = width * height
    bpp = _BYTES_PER_PIXEL.get(mode, 2 if mode.startswith("I;16") else 4)
    need = n * bpp
    if mode in _SCALED_MODES:
        need += n * bpp + n
    if mode != "RGB":
        need += n * 3
    layout = layout or (preprocess_mode("pad") if pad else None)
    if layout is not None:
        cw, ch, _, _ = layout.placement(width, height)
        if (cw, ch) != (width, height):
            need += cw * ch * 3
    return need


def _scaled_to_l(img: Image.Image, scale) -> Image.Image:
    """A one-band image -> 8-bit ``L`` by ``rint(x * scale(lo, hi))`` clipped to [0, 255], in chunks of
    :data:`_CHUNK` pixels with float64 arithmetic (so the values equal a whole-image float64 pass)."""
    arr = np.asarray(img).reshape(-1)  # one copy of PIL's buffer; the float64 work is per chunk
    lo, hi = np.float64(np.inf), np.float64(-np.inf)
    for s in range(0, arr.size, _CHUNK):
        c = arr[s : s + _CHUNK].astype(np.float64)
        lo, hi = np.minimum(lo, c.min()), np.maximum(hi, c.max())  # ufuncs: a NaN stays NaN
    factor = scale(float(lo), float(hi))
    out = np.empty(arr.size, np.uint8)
    for s in range(0, arr.size, _CHUNK):
        c = arr[s : s + _CHUNK].astype(np.float64)
        out[s : s + _CHUNK] = np.clip(np.rint(c * factor), 0, 255)
    del arr
    return Image.fromarray(out.reshape(img.size[1], img.size[0]), "L")


def _float_scale(lo: float, hi: float) -> float:
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise ImageError(f"float image with values in [{lo:g}, {hi:g}]: expected [0, 1] or [0, 255]")
    return 255.0 / (1.0 if hi <= 1.0 else 255.0)  # a [0, 1] float image is the common scientific/HDR-export case


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        return _scaled_to_l(img, _float_scale).convert("RGB")
    if img.mode in _SCALED_MODES:
        if img.mode.startswith("I;16"):
            return _scaled_to_l(img, lambda lo, hi: 255.0 / 65535.0).convert("RGB")
        return _scaled_to_l(img, lambda lo, hi: 255.0 / max(255.0, hi)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # RGBA/LA/PA: the reference's convert('RGB') drops alpha; we keep that, so codes match it.
    return img.convert("RGB")


def open_image(data: bytes, cfg: PreprocessConfig | None = None) -> Image.Image:
    """Decode bytes to an RGB PIL image with EXIF orientation applied.
    Raises :class:`ImageError` with a readable reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    img = _open_header(data)
    _check_size(img, cfg)
    return _decode(img, cfg)


def _open_header(data: bytes) -> Image.Image:
    """PIL's lazy open: the header only, no pixels decoded."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(_unidentified_reason(data)) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageError(f"unreadable header: {type(e).__name__}: {e}") from None


def _check_size(img: Image.Image, cfg: PreprocessConfig | None) -> None:
    """Refuse, from the header's size and mode, an image too large to decode (``max_pixels``,
    ``max_decode_bytes``)."""
    max_pixels = cfg.max_pixels if cfg else DEFAULT_MAX_PIXELS
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"empty image {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    if cfg is not None and cfg.max_decode_bytes is not None:
        need = decode_bytes(img.mode, w, h, layout=cfg.preprocess_mode)
        if need > cfg.max_decode_bytes:
            raise ImageError(
                f"decoding {w}x{h} {img.mode} needs about {need / 2**20:.0f} MiB, more than the "
                f"{cfg.max_decode_bytes / 2**20:.0f} MiB of a decode task"
            )


def _decode(img: Image.Image, cfg: PreprocessConfig | None) -> Image.Image:
    """The pixels, EXIF-transposed, as RGB (a JPEG drafted down to ``image_size`` with ``fast_decode``)."""
    try:
        if cfg is not None and cfg.fast_decode and img.format == "JPEG":
            img.draft("RGB", (cfg.image_size, cfg.image_size))
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img) or img)
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated data, bad EXIF, unsupported modes
        raise ImageError(f"cannot decode: {type(e).__name__}: {e}") from None


def _unidentified_reason(data: bytes) -> str:
    """Why no PIL plugin opened ``data``: the error of the plugin whose signature matches, if any."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or not accept(prefix):
                continue
            factory(io.BytesIO(data), None)  # type: ignore[arg-type]  # PIL plugins take a None filename
        except Exception as e:  # noqa: BLE001 - the plugin's own reason is what we want
            why = str(e)
            if why == "not identified by this driver" and fmt == "PNG" and len(data) >= 24:
                w, h = struct.unpack(">II", data[16:24])
                why = f"header says {w}x{h} pixels" if w == 0 or h == 0 else "unsupported mode or size in header"
            return f"{fmt} file that cannot be opened: {why}"
    return "not an image (format not recognised)"


def expand2square(
    img: Image.Image, background: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The reference's pad-to-square with the mean colour, image centred; the canvas
    (``side**2`` pixels) must fit ``max_pixels`` (:class:`ImageError` at stage preprocess)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    if side * side > max_pixels:
        raise ImageError(
            f"pad canvas {side}x{side} = {side * side} pixels > limit {max_pixels} (--max-pixels)", stage="preprocess"
        )
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return canvas


def _square_placement(w: int, h: int) -> Placement:
    return w, h, 0, 0


def _pad_placement(w: int, h: int) -> Placement:
    side = max(w, h)
    return side, side, (side - w) // 2 if h > w else 0, (side - h) // 2 if w > h else 0  # expand2square's paste


register_preprocess_mode(
    PreprocessMode(
        "square",
        "resize to image_size x image_size (aspect ratio not kept)",
        _square_placement,
        lambda img, background, max_pixels: img,
        llava_do_pad=False,
    )
)
register_preprocess_mode(
    PreprocessMode(
        "pad",
        "paste on a square canvas of the mean colour, then resize (the reference's expand2square)",
        _pad_placement,
        expand2square,
        llava_do_pad=True,
    )
)
PREPROCESS_MODES = tuple(m.name for m in MODES.registered())
"""The ``--preprocess`` choices."""


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> normalised float32 ``[3, S, S]``."""
    try:
        img = cfg.preprocess_mode.canvas(img, cfg.background, cfg.max_pixels)
        img = img.resize((cfg.image_size, cfg.image_size), resample=_RESAMPLE[cfg.resample])
        arr = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
        arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"cannot preprocess: {type(e).__name__}: {e}", stage="preprocess") from None


def load_and_preprocess(data: bytes, cfg: PreprocessConfig) -> tuple[np.ndarray, int, int]:
    """bytes -> (pixels [3,S,S], original width, original height)."""
    img = open_image(data, cfg)
    return preprocess(img, cfg), img.size[0], img.size[1]


def read_file(path) -> bytes:
    from asvr.core.paths import UnsafePathError, read_regular

    try:
        return read_regular(path)  # never blocks on a FIFO named like an image
    except UnsafePathError as e:
        raise ImageError(f"cannot read {path}: {e}") from None
