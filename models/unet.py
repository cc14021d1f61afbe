"""U-Net, for encoder-decoder skips.

Skip ``cat`` between encoder and decoder, ``ConvTranspose2d``, upsample + conv, and ``GroupNorm``
(whose groups must be pruned whole).

Factories return ``(model, example_inputs)`` built under ``seed`` in eval mode (see
:mod:`graphprune.models.cnn_base`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphprune.models.cnn_base import Example, build_seeded

__all__ = [
    "UNet",
    "unet_tiny",
]


def _double_conv(c_in: int, c_out: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Three-level U-Net (Ronneberger et al. 2015) with skip ``cat``.

    The encoder uses BatchNorm and the decoder GroupNorm (4 groups, so pruning it has to keep
    whole groups). The first up-step is a ``ConvTranspose2d``, the second nearest upsample + 1x1
    conv, so both decoder idioms appear.

    Parameters
    ----------
    in_channels, num_classes : int
        Input channels and per-pixel output channels.
    base : int
        Width of the first level (doubled per level, a multiple of 4).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 8) -> None:
        super().__init__()
        b1, b2, b3 = base, 2 * base, 4 * base

        def gn(c: int) -> nn.Module:
            return nn.GroupNorm(4, c)

        self.enc1 = _double_conv(in_channels, b1, nn.BatchNorm2d)
        self.enc2 = _double_conv(b1, b2, nn.BatchNorm2d)
        self.bottom = _double_conv(b2, b3, nn.BatchNorm2d)
        self.up2 = nn.ConvTranspose2d(b3, b2, 2, stride=2)
        self.dec2 = _double_conv(2 * b2, b2, gn)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(b2, b1, 1))
        self.dec1 = _double_conv(2 * b1, b1, gn)
        self.head = nn.Conv2d(b1, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        x = self.bottom(F.max_pool2d(s2, 2))
        x = self.dec2(torch.cat([self.up2(x), s2], dim=1))
        x = self.dec1(torch.cat([self.up1(x), s1], dim=1))
        return self.head(x)


def unet_tiny(seed: int = 0, num_classes: int = 2) -> Example:
    """Widths 8/16/32, input ``(2, 3, 32, 32)``, output ``(2, num_classes, 32, 32)``."""
    return build_seeded(seed, lambda: UNet(3, num_classes, 8), 2, 3, 32, 32)
