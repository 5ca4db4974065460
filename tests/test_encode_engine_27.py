"""asvr.tokenizer.encode_engine on CPU with the real (embedded EfficientNet-Lite0) tokenizer:
the compiled tower is compiled once whatever the batch sizes (partial batches padded, large
ones cut), codes equal ``encode_pixels``; the piecewise (overlap) path gives the same codes;
the pipeline's encode actor takes both options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asvr.tokenizer.encode_engine import EngineOptions, PixelEncoder


def _pixels(tok, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = tok.spec.encoder.image_size
    return torch.rand(n, 3, s, s, generator=g) * 2 - 1


def test_compiled_once_for_every_batch_size(tiny_tokenizer):
    graphs = []

    def counting(gm, example_inputs):  # a torch.compile backend: counts compilations, runs the graph
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    eng = PixelEncoder(tiny_tokenizer, options=EngineOptions(compile=True, compile_backend=counting))
    for n, seed in ((4, 0), (3, 1), (9, 2), (4, 3)):
        px = _pixels(tiny_tokenizer, n, seed)
        codes = eng(px)
        assert codes.shape == (n, 7, 7, 3)
        # each row's features do not depend on the other rows in the batch (eval-mode BN), so
        # the padded/cut batches give the eager codes
        np.testing.assert_array_equal(codes.numpy(), tiny_tokenizer.encode_pixels(px).numpy())
    assert eng.rows == 4
    assert len(graphs) == 1, graphs


@pytest.mark.parametrize("chunks", [2, 3, 10])
def test_pieces_give_the_same_codes(tiny_tokenizer, chunks):
    px = _pixels(tiny_tokenizer, 5, 7)
    eng = PixelEncoder(tiny_tokenizer, options=EngineOptions(chunks=chunks))
    np.testing.assert_array_equal(eng(px).numpy(), tiny_tokenizer.encode_pixels(px).numpy())


def test_options_are_checked():
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        EngineOptions(chunks=0)


def test_encode_actor_with_pieces(tiny_tokenizer_dir, tiny_tokenizer):
    from asvr.pipeline.job.stages import Encoder, TokenizerBuilder

    rng = np.random.default_rng(0)
    s = tiny_tokenizer.spec.encoder.image_size
    px = rng.integers(0, 256, (5, s, s, 3), dtype=np.uint8)
    ok = np.array([True, False, True, True, True])
    plain = Encoder(TokenizerBuilder(str(tiny_tokenizer_dir)))
    pieces = Encoder(TokenizerBuilder(str(tiny_tokenizer_dir), chunks=2))
    batch = {"idx": np.arange(5), "ok": ok, "pixels": px}
    a, b = plain(dict(batch)), pieces(dict(batch))
    np.testing.assert_array_equal(a["codes"], b["codes"])
    assert (b["codes"][1] == 0).all() and b["codes"][ok].any()
