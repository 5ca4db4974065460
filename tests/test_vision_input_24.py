"""The vision input's three modes, each mode's data half and model half (issue 24), on a
3-layer SigLIP tower (7x7 grid of 32-d features), a tokenizer artifact over it (depth 2,
K = 300 codes so that codes need more than 8 bits) and an in-memory code store; no LLM.

References: the codes decoded by hand in float64 (the sum of their codebook vectors, the
cumulative sums of the first D-1 depths), the tower run directly through transformers
(``hidden_states[-2]``), the codes found by a float64 greedy residual search written out
here, the images preprocessed by the tokenizer's own preprocessing, and each refusal's
whole message."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_vision_tower import save_tiny_tower

from asvr.core.shards import ShardMeta
from asvr.tokenizer.preprocess import open_image, preprocess
from asvr.train.data.sources import CodeStore, DataError, FeatureCache
from asvr.train.model.config import VisionSpec
from asvr.train.model.vision_input import (
    VISION_INPUTS,
    CodesSource,
    PixelSource,
    SourceContext,
    TowerFeatures,
    VisionInput,
    get_vision_input,
)
from asvr.train.model.vision_tower import open_vision_tower

K, D, C, GRID = 300, 2, 32, (7, 7)
T = GRID[0] * GRID[1]
KEYS = ["a.png", "sub/b.png", "c.png", "d.png"]


def _codebooks(depth: int = D, k: int = K, seed: int = 0) -> torch.Tensor:
    return torch.randn(depth, k, C, generator=torch.Generator().manual_seed(seed))


def _decode64(cb: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """codes ``[..., D]`` -> the sum of their codebook vectors, in float64 (a shared book: row 0)."""
    out = np.zeros((*codes.shape[:-1], cb.shape[-1]))
    for d in range(codes.shape[-1]):
        out += cb[d if cb.shape[0] > 1 else 0].astype(np.float64)[codes[..., d]]
    return out


def _greedy64(cb: np.ndarray, x: np.ndarray) -> np.ndarray:
    """features ``[..., C]`` -> codes ``[..., D]`` by the greedy residual search in float64."""
    r = x.astype(np.float64).reshape(-1, x.shape[-1])
    codes = []
    for book in cb.astype(np.float64):
        dist = ((r[:, None, :] - book[None]) ** 2).sum(-1)
        c = dist.argmin(-1)
        codes.append(c)
        r = r - book[c]
    return np.stack(codes, -1).reshape(*x.shape[:-1], len(cb))


def _hf_features(folder, pixels: np.ndarray) -> np.ndarray:
    """The tower run through transformers: hidden state -2, ``[N, 49, 32]``."""
    from transformers import SiglipVisionModel

    model = SiglipVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=torch.as_tensor(pixels), output_hidden_states=True).hidden_states[-2].numpy()


def _image(path, size, colour, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    arr[: size[1] // 2] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tower folder, a tokenizer artifact over it, images (one non-square) and a code store."""
    from asvr.tokenizer.artifact import TokenizerSpec, save_artifact
    from asvr.tokenizer.encoders.base import default_encoder_spec
    from asvr.tokenizer.model import SemanticTokenizer

    root = tmp_path_factory.mktemp("vision_input24")
    siglip = save_tiny_tower(root / "siglip", seed=0, hidden=C)
    spec = TokenizerSpec(
        encoder=default_encoder_spec("siglip", str(siglip)),
        preprocess="square",
        grid=GRID,
        dim=C,
        depth=D,
        codebook_size=K,
        shared_codebook=False,
    )
    save_artifact(root / "tok", spec, _codebooks())
    tok = SemanticTokenizer.load(root / "tok")
    images = root / "images"
    for i, key in enumerate(KEYS):
        _image(images / key, (40, 24) if i == 1 else (32, 32), (20 * i, 200, 90), i)
    codes = np.random.default_rng(1).integers(0, K, size=(len(KEYS), T, D)).astype(np.uint16)
    codes[0, 0] = (K - 1, 256)  # above 255: a narrower integer type would wrap
    meta = ShardMeta(fingerprint=tok.spec.fingerprint, grid=GRID, depth=D, codebook_size=K, preprocess="square")
    store = CodeStore(meta, list(KEYS), codes, {k: i for i, k in enumerate(KEYS)})
    tower = open_vision_tower(siglip)
    return root, siglip, tok, images, store, tower


def _vspec(depth=D, k=K):
    return VisionSpec(dim=C, grid=GRID, depth=depth, codebook_size=k)


# --------------------------------------------------------------------------- codes
def test_codes_source_gives_each_keys_codes_as_int64_on_the_grid(world):
    _, _, _, _, store, _ = world
    src = get_vision_input("codes").source(SourceContext(store=store))
    assert isinstance(src, CodesSource)
    for i, key in enumerate(KEYS):
        got = src(key)
        assert got.dtype == np.int64 and got.shape == (*GRID, D)
        np.testing.assert_array_equal(got, store.codes[i].astype(np.int64).reshape(*GRID, D))
    assert src("a.png")[0, 0].tolist() == [K - 1, 256]
    # row-major: position t of the shard row is (t // W, t % W) of the grid
    assert src("c.png")[2, 3].tolist() == store.codes[2, 2 * GRID[1] + 3].tolist()


def test_codes_input_decodes_codes_to_the_sum_of_their_codebook_vectors(world):
    _, _, _, _, store, _ = world
    cb = _codebooks()
    vi = VisionInput("codes", _vspec(), cb)
    assert vi.kind is VISION_INPUTS["codes"] and vi.encoder is None
    codes = torch.from_numpy(np.stack([CodesSource(store)(k) for k in KEYS]))
    got = vi(codes)
    assert got.shape == (len(KEYS), T, C) and got.dtype == torch.float32
    want = _decode64(cb.numpy(), codes.numpy()).reshape(len(KEYS), T, C)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    # a shared book (one codebook for both depths)
    shared = torch.randn(1, K, C, generator=torch.Generator().manual_seed(3))
    got = VisionInput("codes", _vspec(), shared)(codes)
    np.testing.assert_allclose(
        got.numpy(), _decode64(shared.numpy(), codes.numpy()).reshape(len(KEYS), T, C), rtol=1e-5, atol=1e-5
    )
    empty = vi(None)
    assert empty.shape == (0, T, C) and empty.dtype == torch.float32
    with pytest.raises(ValueError) as e:
        vi(codes.float())
    assert str(e.value) == f"codes vision input must be integer [N, H, W, 2], got torch.float32 (4, 7, 7, {D})"
    with pytest.raises(ValueError) as e:
        vi(codes[..., :1])
    assert str(e.value) == "codes vision input must be integer [N, H, W, 2], got torch.int64 (4, 7, 7, 1)"
    with pytest.raises(ValueError) as e:
        vi(codes[:, :6])
    assert str(e.value) == "vision features have shape (4, 42, 32), the model takes [N, 49, 32]"
    # the model's own token count and width, when given
    vi = VisionInput("codes", _vspec(), cb, tokens=42, dim=C)
    assert vi(codes[:, :6]).shape == (4, 42, C) and vi(None).shape == (0, 42, C)
    with pytest.raises(ValueError) as e:
        VisionInput("codes", _vspec(), cb, dim=16)(codes)
    assert str(e.value) == "vision features have shape (4, 49, 32), the model takes [N, 49, 16]"
    assert VisionInput("codes", _vspec(), cb, dim=16)(None).shape == (0, T, 16)


def test_codebooks_that_do_not_fit_the_spec_are_refused():
    for cb in (torch.randn(3, K, C), torch.randn(D, K + 1, C), torch.randn(D, K, C + 1), torch.randn(K, C)):
        with pytest.raises(ValueError) as e:
            VisionInput("codes", _vspec(), cb)
        assert str(e.value) == (f"codebooks of shape {tuple(cb.shape)} do not fit depth {D}, K x C {(K, C)}")
    with pytest.raises(ValueError) as e:
        VisionInput("pixels", _vspec(), _codebooks())
    assert str(e.value) == "vision input must be one of ('online', 'features', 'codes'), got 'pixels'"
    with pytest.raises(ValueError) as e:
        VisionInput("online", _vspec(), _codebooks())
    assert str(e.value) == "vision_input 'online' needs a vision tower (pass a SemanticTokenizer or a tower)"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_code_context_is_the_cumulative_sum_of_the_first_depths(depth):
    cb = _codebooks(depth, 11, seed=depth)
    vi = VisionInput("codes", _vspec(depth, 11), cb)
    codes = torch.from_numpy(np.random.default_rng(depth).integers(0, 11, size=(5, depth)))
    ctx = vi.code_context(codes)
    assert ctx.shape == (5, depth - 1, C) and ctx.dtype == torch.float32
    for j in range(depth - 1):
        want = _decode64(cb.numpy(), codes.numpy()[:, : j + 1])
        np.testing.assert_allclose(ctx[:, j].numpy(), want, rtol=1e-5, atol=1e-5)
    if depth == 2:  # one depth of context: exactly the first code's vector
        np.testing.assert_array_equal(ctx[:, 0].numpy(), cb[0].numpy()[codes[:, 0].numpy()])


def test_codes_from_benchmark_images_are_the_float64_greedy_codes_of_the_tower_features(world):
    _, siglip, tok, images, _, _ = world
    paths = [images / k for k in KEYS[:2]]
    cb = tok.quantizer.codebooks.numpy()
    for mode in ("square", "pad"):
        got = get_vision_input("codes").from_images(paths, tower=None, tokenizer=tok, preprocess=mode)
        pixels = np.stack([preprocess(open_image(p.read_bytes()), tok.preprocess_config(mode)) for p in paths])
        feats = _hf_features(siglip, pixels).reshape(2, *GRID, C)
        assert got.shape == (2, *GRID, D)
        np.testing.assert_array_equal(got.numpy(), _greedy64(cb, feats))
    square = get_vision_input("codes").from_images(paths, tower=None, tokenizer=tok, preprocess="square")
    pad = get_vision_input("codes").from_images(paths, tower=None, tokenizer=tok, preprocess="pad")
    assert torch.equal(square[0], pad[0]) and not torch.equal(square[1], pad[1])  # only b.png is not square


# --------------------------------------------------------------------------- online
def test_online_source_reads_confined_images_with_the_towers_preprocessing(world, tmp_path):
    _, _, tok, images, store, tower = world
    mode = get_vision_input("online")
    for ctx in (SourceContext(store=store, images=str(images)), SourceContext(store=store, tower=tower)):
        with pytest.raises(ValueError) as e:
            mode.source(ctx)
        assert str(e.value) == "the online input needs the vision tower and the image root"
    for pre in ("square", "pad"):
        src = mode.source(SourceContext(store=store, images=str(images), tower=tower, preprocess=pre))
        assert isinstance(src, PixelSource) and src.cfg == tower.preprocess_config(pre) and src.cfg.mode == pre
        got = src("sub/b.png")
        assert got.dtype == np.float32 and got.shape == (3, 28, 28)
        np.testing.assert_array_equal(got, tok.preprocess_images([images / "sub/b.png"], mode=pre)[0])
    outside = tmp_path / "outside.png"
    shutil.copy(images / "a.png", outside)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "root" / "link.png").symlink_to(outside)
    src = PixelSource(tmp_path / "root", tower.preprocess_config("square"))
    for key, why in (
        ("../outside.png", "escapes the image root"),
        ("link.png", "escapes the image root"),
        ("bad.png", "not an image"),
        ("/etc/passwd", "image path is absolute: it escapes the image root"),
    ):
        with pytest.raises(DataError) as e:
            src(key)
        assert str(e.value).startswith(f"{tmp_path / 'root' / key}: ") and why in str(e.value), str(e.value)


def test_a_pixel_source_decodes_under_its_own_limits(world):
    _, _, _, images, _, tower = world
    cfg = tower.preprocess_config("square")
    small = dataclasses.replace(cfg, max_pixels=32 * 32)
    src = PixelSource(images, small)
    np.testing.assert_array_equal(src("a.png"), PixelSource(images, cfg)("a.png"))  # 32x32: at the limit
    assert src("sub/b.png").shape == (3, 28, 28)  # 40x24 = 960 <= 1024 pixels: decoded
    tiny = PixelSource(images, dataclasses.replace(cfg, max_pixels=32 * 32 - 1))
    with pytest.raises(DataError) as e:
        tiny("a.png")
    assert str(e.value) == f"{images / 'a.png'}: decompression bomb: 32x32 = 1024 pixels > limit 1023"
    # and the normalisation it was given (not the tower's)
    other = PixelSource(images, dataclasses.replace(cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    raw = np.asarray(Image.open(images / "a.png").convert("RGB"), dtype=np.float64) / 255
    np.testing.assert_allclose(other("a.png")[:, 0, 0], raw[0, 0], atol=0.02)


def test_online_input_runs_the_frozen_tower_on_pixels(world):
    _, siglip, tok, images, store, tower = world
    assert get_vision_input("online").check_tower(True) is None
    vi = VisionInput("online", _vspec(), _codebooks(), tower)
    assert vi.encoder is tower and not any(p.requires_grad for p in tower.parameters())
    vi.train()
    assert vi.training and not tower.training and not tower.encoder.training
    paths = [images / k for k in KEYS[:3]]
    pixels = get_vision_input("online").from_images(paths, tower=tower, tokenizer=None, preprocess="pad")
    assert isinstance(pixels, torch.Tensor) and pixels.shape == (3, 3, 28, 28)
    np.testing.assert_array_equal(pixels.numpy(), tok.preprocess_images(paths, mode="pad"))
    got = vi(pixels)
    np.testing.assert_allclose(got.numpy(), _hf_features(siglip, pixels.numpy()), rtol=1e-5, atol=1e-5)
    for bad in (pixels[0], pixels[:, :2]):
        with pytest.raises(ValueError) as e:
            vi(bad)
        assert str(e.value) == f"online vision input must be pixels [N, 3, S, S], got {tuple(bad.shape)}"
    assert vi(None).shape == (0, T, C)


# --------------------------------------------------------------------------- features
def test_features_input_passes_features_through_as_float32(world):
    vi = VisionInput("features", _vspec(), _codebooks())
    assert vi.encoder is None
    x = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = vi(x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), x.numpy(), rtol=1e-6)
    grid = vi(x.reshape(2, *GRID, C))  # a grid of features is flattened row-major
    np.testing.assert_array_equal(grid.numpy(), got.numpy())


def test_features_source_computes_on_demand_or_fills_and_reads_its_cache(world, tmp_path, capfd):
    root, siglip, tok, images, store, tower = world
    mode = get_vision_input("features")
    with pytest.raises(ValueError) as e:
        mode.source(SourceContext(store=store, images=str(images)))
    assert str(e.value) == "the features input needs the vision tower"
    want = {
        k: f for k, f in zip(KEYS, _hf_features(siglip, tok.preprocess_images([images / k for k in KEYS], mode="pad")))
    }
    on_demand = mode.source(SourceContext(store=store, images=str(images), tower=tower, preprocess="pad"))
    assert isinstance(on_demand, TowerFeatures) and on_demand.mode == "pad"
    np.testing.assert_allclose(on_demand("sub/b.png"), want["sub/b.png"], rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError) as e:
        on_demand("nothing.png")
    assert str(e.value).startswith("computing features: cannot open:")
    with pytest.raises(DataError) as e:
        on_demand("../siglip/config.json")
    assert str(e.value) == "computing features: image path escapes the image root"
    # the cache: named by the tower's fingerprint and the store's preprocess mode
    cache = mode.open_cache(tmp_path / "cache", store, tower)
    assert isinstance(cache, FeatureCache) and cache.path.parent == tmp_path / "cache"
    assert cache.path.name.startswith(f"features-{tower.spec.fingerprint[:12]}-square-")
    assert mode.needs_image("a.png", cache) and mode.needs_image("a.png", None)
    barriers = []
    ctx = SourceContext(
        store=store,
        images=str(images),
        tower=tower,
        preprocess="pad",
        cache=cache,
        keys=KEYS[:3],
        barrier=lambda: barriers.append(1),
        progress=False,
    )
    capfd.readouterr()
    get = mode.source(ctx)
    assert "caching features" not in capfd.readouterr().err  # progress off: no bar
    assert barriers == [1] and get == cache.get
    for k in KEYS[:3]:
        np.testing.assert_allclose(get(k), want[k], rtol=1e-5, atol=1e-5)
        assert not mode.needs_image(k, cache)
    assert mode.needs_image("d.png", cache)
    # another rank (not primary) over more keys than were cached: refused, no filling
    other = FeatureCache.open(tmp_path / "cache", store, tower.spec.fingerprint)
    late = SourceContext(store=store, images=str(images), tower=tower, cache=other, keys=KEYS, primary=False)
    with pytest.raises(DataError) as e:
        mode.source(late)
    assert str(e.value) == f"feature cache {other.path} lacks 1 keys (e.g. 'd.png')"
    assert "d.png" not in other
    # the primary with its progress bar on fills only the missing row
    late.primary, late.progress = True, True
    get = mode.source(late)
    assert "caching features" in capfd.readouterr().err
    np.testing.assert_allclose(get("d.png"), want["d.png"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(get("a.png"), want["a.png"], rtol=1e-5, atol=1e-5)


def test_features_from_benchmark_images_are_the_towers_features(world):
    _, siglip, tok, images, _, tower = world
    paths = [images / k for k in KEYS[1:3]]
    got = get_vision_input("features").from_images(paths, tower=tower, tokenizer=None, preprocess="pad")
    want = _hf_features(siglip, tok.preprocess_images(paths, mode="pad"))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the modes' checks
def test_each_mode_says_what_it_needs(world):
    _, _, _, _, store, tower = world
    assert tuple(VISION_INPUTS) == ("online", "features", "codes")
    assert [m.uses_tower for m in VISION_INPUTS.values()] == [True, True, False]
    assert [m.model_runs_tower for m in VISION_INPUTS.values()] == [True, False, False]
    with pytest.raises(ValueError) as e:
        get_vision_input("codes").check_tower(True)
    assert str(e.value) == (
        "--vision-tower feeds the online and features inputs; the codes input rebuilds the features from the codes"
    )
    get_vision_input("codes").check_tower(False)
    get_vision_input("features").check_tower(True)
    for name in ("online", "features"):
        for images in (None, ""):
            with pytest.raises(ValueError) as e:
                get_vision_input(name).check_images(images)
            assert str(e.value) == f"vision input {name!r} needs --images (the image root)"
        get_vision_input(name).check_images("imgs")
        assert get_vision_input(name).needs_image("a.png", None)
    get_vision_input("codes").check_images(None)
    assert not get_vision_input("codes").needs_image("a.png", None)
    assert get_vision_input("codes").open_cache(Path("x"), store, tower) is None
    assert get_vision_input("online").open_cache(Path("x"), store, tower) is None
    ctx = SourceContext(store=store)
    assert (ctx.images, ctx.tower, ctx.preprocess, ctx.cache, tuple(ctx.keys), ctx.primary, ctx.progress) == (
        None,
        None,
        "square",
        None,
        (),
        True,
        True,
    )
    assert ctx.barrier() is None


def test_modes_that_do_not_run_the_tower_do_not_hold_it(world):
    """Given a tower, features and codes leave it out of the model (no encoder, none of its
    weights in the parameters or the state dict); online holds it, frozen."""
    _, _, _, _, _, tower = world
    n_tower = len(tower.state_dict())
    for name in ("features", "codes"):
        vi = VisionInput(name, _vspec(), _codebooks(), tower)
        assert vi.encoder is None, name
        assert list(vi.parameters()) == [] and len(vi.state_dict()) == 0, name
    vi = VisionInput("online", _vspec(), _codebooks(), tower)
    assert vi.encoder is tower and len(vi.state_dict()) == n_tower > 0
