"""Decoding and preprocessing against independent numpy/PIL re-implementations."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from asvr.tokenizer.preprocess import ImageError, PreprocessConfig, open_image, preprocess
from conftest import image_bytes, make_image

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalise(img: Image.Image, size: int, mean, std) -> np.ndarray:
    arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return ((arr - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [(96, 72), (50, 90), (64, 64)])
def test_square_matches_reference(size):
    img = make_image(1, size)
    cfg = PreprocessConfig(image_size=40, mean=MEAN, std=STD, mode="square")
    np.testing.assert_allclose(preprocess(img, cfg), _normalise(img, 40, MEAN, STD), rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(96, 72), (50, 91), (64, 64)])
def test_pad_matches_reference(size):
    img = make_image(2, size)
    w, h = size
    side = max(w, h)
    bg = [int(255 * m) for m in MEAN]
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = bg
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = np.asarray(img)
    want = _normalise(Image.fromarray(canvas), 40, MEAN, STD)
    cfg = PreprocessConfig(image_size=40, mean=MEAN, std=STD, mode="pad")
    np.testing.assert_allclose(preprocess(img, cfg), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("orientation,k", [(6, -1), (3, 2), (8, 1)])
def test_exif_orientation(orientation, k):
    img = make_image(3, (60, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    raw = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # stored pixels, not rotated
    got = open_image(buf.getvalue())
    np.testing.assert_array_equal(np.asarray(got), np.rot90(raw, k=k))
    assert got.size == ((40, 60) if orientation in (6, 8) else (60, 40))


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("fmt", "PNG"), **kw)
    return buf.getvalue()


def test_modes_become_rgb_with_the_right_content():
    rgb = np.asarray(make_image(4, (20, 10)))
    grey = rgb[..., 0]
    # L
    got = np.asarray(open_image(_png(Image.fromarray(grey, "L"))))
    np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, -1))
    # LA: alpha dropped
    la = Image.fromarray(np.stack([grey, np.full_like(grey, 7)], -1), "LA")
    np.testing.assert_array_equal(np.asarray(open_image(_png(la))), np.repeat(grey[..., None], 3, -1))
    # RGBA: alpha dropped (as the reference's convert('RGB'))
    rgba = Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 3, np.uint8)], -1), "RGBA")
    np.testing.assert_array_equal(np.asarray(open_image(_png(rgba))), rgb)
    # P (with and without transparency): palette colours
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    idx = (np.arange(200).reshape(10, 20) % 4).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal.flatten().tolist())
    np.testing.assert_array_equal(np.asarray(open_image(_png(p))), pal[idx])
    np.testing.assert_array_equal(np.asarray(open_image(_png(p, transparency=1))), pal[idx])
    # CMYK (JPEG): pure inks -> primaries
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[:, :4] = (0, 255, 255, 0)  # red
    cmyk[:, 4:] = (255, 255, 0, 0)  # blue
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, format="TIFF")
    got = np.asarray(open_image(buf.getvalue()))
    np.testing.assert_array_equal(got[:, :4], np.broadcast_to([255, 0, 0], (8, 4, 3)))
    np.testing.assert_array_equal(got[:, 4:], np.broadcast_to([0, 0, 255], (8, 4, 3)))
    # I;16: scaled to 8 bits, not clipped
    v = (np.arange(100).reshape(10, 10) * 655).astype(np.uint16)
    got = np.asarray(open_image(_png(Image.frombytes("I;16", (10, 10), v.astype("<u2").tobytes()))))
    want = np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, -1))


def test_bad_inputs_give_image_errors():
    data = image_bytes(5, size=(200, 150))
    cases = {
        "empty": (b"", "empty file"),
        "text": (b"this is not an image at all", "not an image"),
        "truncated": (data[: len(data) // 2], "cannot decode"),
    }
    for name, (blob, reason) in cases.items():
        with pytest.raises(ImageError, match=reason) as e:
            open_image(blob)
        assert e.value.stage == "decode", name
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(data, PreprocessConfig(image_size=32, max_pixels=1000))


def test_a_registered_mode_is_validated_applied_and_asked_for_its_geometry():
    """A preprocess mode is one ``register_preprocess_mode``: the config accepts it, ``preprocess``
    applies its canvas, the decode-memory estimate and the inspector's patch boxes use its
    placement; an unknown name is refused with the known ones; LLaVA's do_pad maps to square/pad."""
    from asvr.tokenizer.codes.inspection import patch_box
    from asvr.tokenizer.preprocess import (
        MODES,
        PreprocessMode,
        decode_bytes,
        llava_mode,
        preprocess_mode,
        register_preprocess_mode,
    )

    def topleft(w, h):
        side = min(w, h)
        return side, side, 0, 0

    register_preprocess_mode(
        PreprocessMode(
            "test-topleft",
            "crop the top-left square",
            topleft,
            lambda img, background, max_pixels: img.crop((0, 0, min(img.size), min(img.size))),
        )
    )
    try:
        img = make_image(3, (96, 72))
        cfg = PreprocessConfig(image_size=24, mean=MEAN, std=STD, mode="test-topleft")
        ref = _normalise(img.crop((0, 0, 72, 72)), 24, MEAN, STD)
        np.testing.assert_allclose(preprocess(img, cfg), ref, atol=1e-5)
        assert decode_bytes("RGB", 96, 72, layout=cfg.preprocess_mode) == 96 * 72 * 3 + 72 * 72 * 3
        assert patch_box(1, 1, (2, 2), (96, 72), "test-topleft") == pytest.approx((36, 36, 72, 72))
        assert preprocess_mode("test-topleft").llava_do_pad is None  # no LLaVA processor does it
        with pytest.raises(ValueError, match=r"must be one of \('square', 'pad', 'test-topleft'\), got 'nope'"):
            PreprocessConfig(image_size=8, mode="nope")
    finally:
        MODES.unregister("test-topleft")
    with pytest.raises(ValueError, match="preprocess mode must be one of"):
        PreprocessConfig(image_size=8, mode="test-topleft")
    assert (llava_mode(True), llava_mode(False)) == ("pad", "square")
    assert decode_bytes("RGB", 96, 72, pad=True) == 96 * 72 * 3 + 96 * 96 * 3  # the pad canvas, as before
