"""Tiny hand-written modules covering each kernel family of the CPU rules."""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """conv3x3 + BN + ReLU, depthwise 3x3, pointwise 1x1, stride-2 conv, pool, Linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.down = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.pw(self.dw(y)))
        y = self.down(y) + 1.0
        return self.fc(y.mean((2, 3)))


class Attention(nn.Module):
    """Linear projections + q @ k^T + softmax + @ v: batch matmul with an activation transpose."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 5)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.a(x), torch.relu(self.b(x))


def seeded(cls, *args, seed: int = 0):
    torch.manual_seed(seed)
    m = cls(*args).eval()
    for mod in m.modules():  # non-trivial BN statistics so the folded scale/shift matter
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


class OddChannels(nn.Module):
    """Pruned-MobileNet-like widths that waste 16-lane vectors (12 and 72 channels): 1x1
    projection + BN into a residual add, 1x1 expansion, depthwise 3x3, ReLU, pool, Linear."""

    def __init__(self, cin: int = 12, mid: int = 72):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin))
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.ReLU())  # fmt: skip
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), nn.ReLU())  # fmt: skip
        self.project = nn.Sequential(nn.Conv2d(mid, cin, 1, bias=False), nn.BatchNorm2d(cin))
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.project(self.dw(self.expand(y)))
        return self.fc(y.mean((2, 3)))
