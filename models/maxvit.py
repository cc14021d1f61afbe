"""A MaxViT-pattern model: MBConv, then block (local) and grid (dilated global) attention.

Written from the pattern (Tu et al., 2022, "MaxViT: Multi-Axis Vision Transformer"), not from a
library. Each block runs an MBConv (1x1 expand, depthwise 3x3, 1x1 project, residual) on the
channels-first map, turns it channels-last, and runs two attentions that differ only in how the
``H × W`` grid is partitioned into groups of ``P × P`` tokens:

* **block attention**: non-overlapping ``P × P`` windows,
  ``(B, H/P, P, W/P, P, C) → permute(0, 1, 3, 2, 4, 5) → (B·H/P·W/P, P², C)``;
* **grid attention**: a fixed ``G × G`` grid of tokens spaced ``H/G`` apart,
  ``(B, G, H/G, G, W/G, C) → permute(0, 2, 4, 1, 3, 5) → (B·H/G·W/G, G², C)``;

each followed by a pre-norm MLP. Attention uses a fused ``qkv`` projection and a learned
``(heads, P², P²)`` bias added to the logits directly (no index table, unlike ``swin``).

What it exercises: partition reshapes whose leading axis is ``batch × window count`` and whose
token axis is a factor of the spatial axes, on two different factorizations of the same grid;
a *parameter* (the bias) lying on the token axes, which must stay frozen (the window geometry
is not a channel); heads (with the bias's head axis), head_dim, the MBConv expansion and the
MLP widths are prunable, and the stream width ``C`` through MBConv, both attentions and the
classifier is one group.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaxViTTiny", "maxvit_tiny"]


class MBConv(nn.Module):
    """1x1 expand → BN → GELU → depthwise 3x3 → BN → GELU → 1x1 project → BN, plus the input."""

    def __init__(self, dim: int, expand: int = 2):
        super().__init__()
        hidden = dim * expand
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PartitionAttention(nn.Module):
    """Multi-head self-attention inside each group of ``P²`` tokens, with a per-head learned
    ``(P², P²)`` bias; ``grid`` picks the grid partition instead of windows."""

    def __init__(self, dim: int, heads: int, part: int, grid: bool):
        super().__init__()
        self.heads, self.part, self.grid = heads, part, grid
        self.scale = (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        n = part * part
        self.rel_bias = nn.Parameter(torch.randn(heads, n, n) * 0.02)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        p = self.part
        if self.grid:  # p × p tokens spaced (h/p, w/p) apart
            x = x.view(b, p, h // p, p, w // p, c).permute(0, 2, 4, 1, 3, 5)
        else:  # p × p neighbouring tokens
            x = x.view(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, p * p, c)

    def unpartition(self, x: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        p, c = self.part, x.shape[-1]
        if self.grid:
            x = x.view(b, h // p, w // p, p, p, c).permute(0, 3, 1, 4, 2, 5)
        else:
            x = x.view(b, h // p, w // p, p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        b, h, w, c = x.shape
        t = self.partition(self.norm(x))
        g, n, _ = t.shape  # g = B × groups, n = P²
        qkv = self.qkv(t).reshape(g, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_bias
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(g, n, c)
        return x + self.unpartition(self.proj(out), b, h, w)


class MaxViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, part: int):
        super().__init__()
        self.mbconv = MBConv(dim)
        self.block_attn = PartitionAttention(dim, heads, part, grid=False)
        self.block_mlp = _mlp(dim)
        self.grid_attn = PartitionAttention(dim, heads, part, grid=True)
        self.grid_mlp = _mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        x = self.mbconv(x).permute(0, 2, 3, 1)
        x = self.block_attn(x)
        x = x + self.block_mlp(x)
        x = self.grid_attn(x)
        x = x + self.grid_mlp(x)
        return x.permute(0, 3, 1, 2)


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                         nn.Linear(2 * dim, dim))  # fmt: skip


class MaxViTTiny(nn.Module):
    """Stride-2 conv stem, ``depth`` MaxViT blocks, LayerNorm, mean pooling, a classifier."""

    def __init__(self, dim: int = 32, heads: int = 2, part: int = 4, depth: int = 2,
                 num_classes: int = 10):  # fmt: skip
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim),
                                  nn.GELU())  # fmt: skip
        self.blocks = nn.ModuleList(MaxViTBlock(dim, heads, part) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x.flatten(2).transpose(1, 2)).mean(1))


def maxvit_tiny(seed: int = 0, batch: int = 2, **kwargs) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Two MaxViT blocks on 32×32 images (a 16×16 map, 4×4 windows and a 4×4 grid)."""
    torch.manual_seed(seed)
    model = MaxViTTiny(**kwargs).eval()
    return model, (torch.randn(batch, 3, 32, 32),)
