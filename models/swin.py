"""A Swin-pattern transformer: window attention with a relative-position bias.

Written from the pattern (Liu et al., 2021, "Swin Transformer"), not from a library: patch
embedding, then blocks that partition the token grid into ``window × window`` windows
(reshape → permute → reshape), run multi-head attention inside each window with a fused ``qkv``
projection and a learned bias looked up through an integer *relative-position index*, and undo
the partition. Every other block shifts the grid by half a window (``torch.roll``) and masks
attention across the wrap-around seams.

What it exercises: the relative-position index is an integer buffer used as a gather index (an
ONNX initializer that looks like a parameter: its axes, the window positions, must be frozen);
the window axes are factors of the spatial axes; the fused ``qkv`` axis ``3 × heads × head_dim``
must keep its ``3``; heads and MLP hidden channels are prunable.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SwinTiny", "swin_tiny"]


def relative_position_index(window: int) -> torch.Tensor:
    """``(window², window²)`` index into a ``(2·window-1)²`` bias table: for each pair of
    positions of a window, the row of their (dy, dx) offset."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()])  # (2, w²)
    rel = pos[:, :, None] - pos[:, None, :] + (window - 1)  # offsets shifted to >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """``(windows, w², w²)`` additive mask: -100 between positions that a cyclic shift brought
    together from different image regions, 0 elsewhere."""
    region = torch.zeros(size, size)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    n = 0
    for sy in cuts:
        for sx in cuts:
            region[sy, sx] = n
            n += 1
    r = size // window
    win = region.view(r, window, r, window).permute(0, 2, 1, 3).reshape(r * r, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer("rel_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape  # b = batch × windows, n = window²
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.bias_table[self.rel_index.view(-1)].view(n, n, self.heads)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            w = mask.shape[0]
            attn = attn.view(b // w, w, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(b, self.heads, n, n)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, size: int, window: int, shift: int):
        super().__init__()
        self.size, self.window, self.shift = size, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        mask = shift_mask(size, window, shift) if shift else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        s, w, r = self.size, self.window, self.size // self.window
        h = self.norm1(x).view(b, s, s, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = h.view(b, r, w, r, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b * r * r, w * w, c)
        h = self.attn(h, self.mask)
        h = h.view(b, r, r, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, s, s, c)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, s * s, c)
        return x + self.mlp(self.norm2(x))


class SwinTiny(nn.Module):
    """Patch embedding, ``depth`` window/shifted-window blocks, mean pooling, a classifier."""

    def __init__(self, image: int = 32, patch: int = 2, dim: int = 32, heads: int = 2,
                 window: int = 4, depth: int = 2, num_classes: int = 10):  # fmt: skip
        super().__init__()
        size = image // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, size, window, (window // 2) if i % 2 else 0)
            for i in range(depth))  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def swin_tiny(seed: int = 0, batch: int = 2, **kwargs) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A two-block Swin-pattern model on 32×32 images (16×16 tokens, 4×4 windows)."""
    torch.manual_seed(seed)
    model = SwinTiny(**kwargs).eval()
    return model, (torch.randn(batch, 3, 32, 32),)
