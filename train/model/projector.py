"""Vision input projector: vision feature size C -> LLM width.

``mlp2x_gelu`` is the reference's (LLaVA-1.5): ``Linear(C, H) GELU Linear(H, H)``.
``linear`` and ``mlpNx_gelu`` (N Linear layers, GELU between) are accepted too.
"""

from __future__ import annotations

import re

from torch import nn


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown projector {kind!r} (use linear or mlpNx_gelu, e.g. mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
