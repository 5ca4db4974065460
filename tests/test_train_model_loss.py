"""Chunked linear+CE and the visual head against naive full-logits references (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asvr.train.config import VisualHeadConfig
from asvr.train.model.visual_head import VisualHead
from asvr.train.model.visual_loss import linear_cross_entropy, naive_linear_cross_entropy


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("n,chunk,bias", [(37, 8, True), (37, 64, False), (5, 1, True), (0, 4, True)])
def test_linear_cross_entropy_equals_naive_fp64(n, chunk, bias):
    g = torch.Generator().manual_seed(n + chunk)
    k, e = 53, 12
    x = torch.randn(n, e, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(k, e, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, k, (n,), generator=g)
    if n > 3:
        t[1] = t[3] = -100  # ignored rows
    params = [x, w] + ([b] if bias else [])
    got, hits = linear_cross_entropy(x, w, b, t, chunk)
    want = naive_linear_cross_entropy(x, w, b, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    logits = F.linear(x, w, b)
    assert hits.dtype == torch.long and int(hits) == int(((logits.argmax(-1) == t) & (t != -100)).sum())
    # a non-trivial upstream gradient (the loss is scaled before backward)
    for gg, gw in zip(_grads(got * 0.37, params), _grads(want * 0.37, params)):
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    w = torch.randn(30, 16, generator=g) * 0.3
    t = torch.randint(0, 30, (40,), generator=g)
    got, _ = linear_cross_entropy(x.bfloat16(), w.bfloat16(), None, t, 7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_linear_cross_entropy(x, w, None, t), rtol=2e-2, atol=0)
    assert naive_linear_cross_entropy(x.bfloat16(), w.bfloat16(), None, t).dtype == torch.float32  # upcast too


def test_linear_cross_entropy_with_a_frozen_classifier():
    """Only ``x`` needs a gradient (a frozen head): no weight gradient is made, ``x``'s is exact."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=g)
    b = torch.randn(7, dtype=torch.float64, generator=g)
    t = torch.randint(0, 7, (9,), generator=g)
    got, _ = linear_cross_entropy(x, w, b, t, 4)
    (gx,) = _grads(got, [x])
    torch.testing.assert_close(gx, _grads(naive_linear_cross_entropy(x, w, b, t), [x])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xs,ts", [((4, 3, 1), (4,)), ((4, 3), (3,)), ((4, 3), (4, 1))])
def test_linear_cross_entropy_refuses_misshaped_inputs(xs, ts):
    with pytest.raises(ValueError) as e:
        linear_cross_entropy(torch.zeros(xs), torch.zeros(2, 3), None, torch.zeros(ts, dtype=torch.long))
    assert str(e.value) == f"x must be [N, E] and target [N]; got {xs} and {ts}"


def _naive_head_loss(head: VisualHead, hidden, ctx, targets):
    """Full [N, D, K] logits, F.cross_entropy per depth."""
    x = head.states(hidden, ctx)
    return torch.stack(
        [
            F.cross_entropy(F.linear(x[:, d], c.weight, c.bias), targets[:, d], reduction="sum")
            for d, c in enumerate(head.classifiers)
        ]
    )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_visual_head_chunked_loss_equals_naive_fp64(checkpointing):
    torch.manual_seed(0)
    depth, k, c, hid = 4, 29, 6, 10
    head = VisualHead(VisualHeadConfig(proj_hidden=12, width=16, layers=2, head_dim=8), hid, c, depth, k).double()
    head.gradient_checkpointing = checkpointing
    n = 23
    hidden = torch.randn(n, hid, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(n, depth - 1, c, dtype=torch.float64)
    targets = torch.randint(0, k, (n, depth))
    params = [hidden] + list(head.parameters())
    sums, hits = head.loss(hidden, ctx, targets, chunk=5)
    want = _naive_head_loss(head, hidden, ctx, targets)
    torch.testing.assert_close(sums, want, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([0.3, 1.0, 0.7, 0.1], dtype=torch.float64)
    for a, b in zip(_grads((sums * weights).sum(), params), _grads((want * weights).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_visual_head_is_causal_over_depth():
    """The state at depth d must not depend on the code context of depths >= d."""
    torch.manual_seed(1)
    head = VisualHead(VisualHeadConfig(proj_hidden=8, width=16, layers=2, head_dim=8), 10, 6, 4, 9).double()
    hidden = torch.randn(3, 10, dtype=torch.float64)
    ctx = torch.randn(3, 3, 6, dtype=torch.float64)
    ctx2 = ctx.clone()
    ctx2[:, 2] += 1.0  # context of depth index 3 (cumulative sum of depths 0..2)
    a, b = head.states(hidden, ctx), head.states(hidden, ctx2)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_visual_head_predict_matches_teacher_forcing_on_its_own_codes():
    torch.manual_seed(2)
    depth, k, c = 3, 11, 5
    head = VisualHead(VisualHeadConfig(proj_hidden=8, width=16, layers=1, head_dim=8), 10, c, depth, k).double()
    books = torch.randn(depth, k, c, dtype=torch.float64)

    def cumulative(codes):
        return torch.stack([books[d][codes[:, d]] for d in range(codes.shape[1])], 1).cumsum(1)

    hidden = torch.randn(4, 10, dtype=torch.float64)
    codes = head.predict(hidden, cumulative)
    x = head.states(hidden, cumulative(codes[:, :-1]))
    again = torch.stack([head.classifiers[d].logits(x[:, d]).argmax(-1) for d in range(depth)], 1)
    assert torch.equal(codes, again)
