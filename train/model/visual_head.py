"""The ASVR visual head: reconstruct the semantic RVQ codes of each image
position from the LLM's hidden state, autoregressively over depth.

Per image position (a row), with D residual depths and codebooks ``c_d``:

```
z      = proj(h_llm)                       hidden -> proj_hidden -> width (GELU)
x_1    = z
x_d    = code_in(sum_{j<d} c_j[t_j])       d = 2..D, teacher forcing on the
                                           ground-truth codes t (frozen codebooks)
x      = depth transformer(x_1..x_D)       causal over the D depths
logits_d = classifier_d(RMSNorm(x_d))      one Linear(width, K) per depth
```

Choices followed from the reference (ASVR's ``RQTransformer`` "new head" and
``CasualDepthTransformerLayer``):

* projector ``Linear(hidden, 2048) GELU Linear(2048, 2048)`` on the LLM state
  of each image position, the state *at* that position (no shift: the
  reference extracts ``hidden[start:end]`` of the image span);
* depth inputs: the cumulative sum of the frozen codebook vectors of the
  ground-truth codes of depths < d, through ``Linear(C, width)`` (the
  reference's ``in_mlp_1``; kept even when C == width, as the reference);
* 3 layers; each: pre-RMSNorm causal self-attention (``width // 128`` heads,
  biases as ``nn.MultiheadAttention``), residual, then **RMSNorm of the
  residual stream** (the reference normalises the stream itself, not only the
  FFN input), then a depth-specific FFN (a separate ``width -> 2 width -> width``
  GELU MLP without biases for each depth position), residual;
* no depth position embedding (the depth-specific FFNs and the causal mask
  carry the position);
* a final RMSNorm and one ``Linear(width, K)`` with bias per depth;
* loss: mean over depths of the per-depth CE (mean over rows), weight 1.

Differences: the per-depth FFN weights are stored as ``[D, F, E]`` tensors
initialised with each depth's own fan-in (the reference reshapes one
``Linear(E*D, 2E)``, whose init uses fan-in ``E*D``); the classifier CE is
chunked (``visual_loss.py``) instead of materialising ``[N, D, K]`` logits.

Every parameter-owning module is invoked through ``__call__`` (never by
reading ``.weight`` from outside), so DeepSpeed ZeRO-3 gathers parameters.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from asvr.train.model.config import VisualHeadConfig
from asvr.train.model.visual_loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class DepthAttention(nn.Module):
    """Causal multi-head self-attention over the D depths of each row."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.heads = width // head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, e = x.shape
        q, k, v = self.qkv(x).view(n, d, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, d, e))


class DepthFFN(nn.Module):
    """A separate GELU MLP (no biases) for each depth position."""

    def __init__(self, depth: int, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(depth, hidden, width))
        self.w2 = nn.Parameter(torch.empty(depth, width, hidden))
        nn.init.uniform_(self.w1, -1 / math.sqrt(width), 1 / math.sqrt(width))
        nn.init.uniform_(self.w2, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, d <= D, E]
        d = x.shape[1]
        w1, w2 = (self.w1, self.w2) if d == self.w1.shape[0] else (self.w1[:d], self.w2[:d])
        # depth-major batched matmuls: [d, N, E] x [d, E, F]; transposes are views, bmm takes them as is
        h = F.gelu(torch.bmm(x.transpose(0, 1), w1.transpose(1, 2)))
        return torch.bmm(h, w2.transpose(1, 2)).transpose(0, 1)


class DepthLayer(nn.Module):
    def __init__(self, depth: int, cfg: VisualHeadConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = DepthAttention(cfg.width, cfg.head_dim)
        self.norm2 = RMSNorm(cfg.width, cfg.norm_eps)
        self.ffn = DepthFFN(depth, cfg.width, cfg.ffn_mult * cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm2(x + self.attn(self.norm1(x)))  # the reference normalises the stream here
        return x + self.ffn(x)


class DepthClassifier(nn.Linear):
    """``Linear(width, K)`` for one depth whose ``forward`` returns the chunked
    CE sum and the argmax hit count, not logits (``logits()`` gives those)."""

    # Deliberately not Linear's signature: the logits never materialise (see the class doc).
    def forward(  # type: ignore[override]
        self, x: torch.Tensor, target: torch.Tensor, chunk: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(x, self.weight, self.bias, target, chunk)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VisualHead(nn.Module):
    def __init__(self, cfg: VisualHeadConfig, llm_hidden: int, code_dim: int, depth: int, codebook_size: int):
        super().__init__()
        self.depth = depth
        self.proj = nn.Sequential(
            nn.Linear(llm_hidden, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, cfg.width)
        )
        self.code_in = nn.Linear(code_dim, cfg.width)
        self.layers = nn.ModuleList(DepthLayer(depth, cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.classifiers = nn.ModuleList(DepthClassifier(cfg.width, codebook_size) for _ in range(depth))
        self.gradient_checkpointing = False

    def states(self, hidden: torch.Tensor, code_context: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[N, H_llm]`` and ``code_context`` ``[N, d-1, C]`` (cumulative
        codebook sums of the known codes, ``d <= D``) -> normed states ``[N, d, width]``."""
        x = self.proj(hidden)[:, None]
        if code_context.shape[1]:
            x = torch.cat([x, self.code_in(code_context.to(x.dtype))], dim=1)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm(x)

    def loss(
        self, hidden: torch.Tensor, code_context: torch.Tensor, targets: torch.Tensor, chunk: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced loss.  ``targets`` ``[N, D]``, ``code_context`` ``[N, D-1, C]``.
        Returns per-depth CE *sums* ``[D]`` (fp32+) and per-depth argmax hits ``[D]``."""
        x = self.states(hidden, code_context)
        sums, hits = zip(*(clf(x[:, d], targets[:, d], chunk) for d, clf in enumerate(self.classifiers)))
        return torch.stack(sums), torch.stack(hits)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor, cumulative_fn) -> torch.Tensor:
        """Greedy codes ``[N, D]``: depth by depth, feeding back the predicted codes.
        ``cumulative_fn(codes [N, d]) -> [N, d, C]`` gives codebook cumulative sums."""
        codes = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
        for d in range(self.depth):
            ctx = cumulative_fn(codes) if d else hidden.new_zeros(hidden.shape[0], 0, self.code_in.in_features)
            x = self.states(hidden, ctx)
            codes = torch.cat(
                [codes, cast(DepthClassifier, self.classifiers[d]).logits(x[:, d]).argmax(-1, keepdim=True)], dim=1
            )
        return codes
