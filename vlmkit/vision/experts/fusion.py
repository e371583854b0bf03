"""Fusion modules: per-expert projection of backbone features into the language model's width (the
multi-patch-one-token ``MLPProjector`` and the Q-Former-style ``QFormerResampler``)."""

from __future__ import annotations

import torch
from torch import nn

from .checks import query_grid


# ------------------------------------------------------------------------------------------------
# Fusion modules
# ------------------------------------------------------------------------------------------------


class MLPProjector(nn.Module):
    """Multi-patch-one-token MLP: [N, R·C, F] → mh×mw windows concatenated → [N, (R/mh)·(C/mw), D].

    LLaVA-1.5's ``mlp2x_gelu`` (Linear F·mh·mw → D, GELU, Linear D → D) on the merged windows.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], merge: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        (R, C), (mh, mw) = grid, merge
        if R % mh or C % mw:
            raise ValueError(f"merge window {mh}×{mw} does not tile the expert's {R}×{C} grid")
        self.grid, self.merge = (R, C), (mh, mw)
        self.fc1 = nn.Linear(in_dim * mh * mw, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    @property
    def out_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.merge[0], self.grid[1] // self.merge[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, n, dim = x.shape
        (R, C), (mh, mw) = self.grid, self.merge
        if n != R * C:
            raise ValueError(f"expected {R}×{C}={R * C} expert features, got {n}")
        if (mh, mw) != (1, 1):
            x = x.reshape(N, R // mh, mh, C // mw, mw, dim).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(N, (R // mh) * (C // mw), mh * mw * dim)
        return self.fc2(self.act(self.fc1(x)))


class QFormerBlock(nn.Module):
    """Pre-LN block on queries [N, Q, D]: self-attention, cross-attention to features [N, n, D], MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm2(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


class QFormerResampler(nn.Module):
    """Q-Former-style resampler: features [N, n, F] → ``num_queries`` tokens [N, Q, D] of the LM width."""

    def __init__(self, in_dim: int, width: int, num_queries: int, heads: int = 8, layers: int = 2) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"qformer_heads {heads} must divide the language model's width {width}")
        self.input = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.blocks = nn.ModuleList([QFormerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, width)
        self.out_grid = query_grid(num_queries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.input(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.output(self.norm(q))
