"""Mobile architectures: depthwise and grouped convs.

* ``MobileNetV2``: depthwise conv (``groups == channels``) ties input to output channels;
  residual add only between stride-1 blocks of equal width; ReLU6.
* ``ShuffleNet``: ``chunk`` + ``cat`` + channel shuffle (``reshape``/``transpose``/``reshape``)
  and grouped 1x1 convs (``groups`` of 2 and 4).

Factories return ``(model, example_inputs)`` built under ``seed`` in eval mode (see
:mod:`graphprune.models.cnn_base`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphprune.models.cnn_base import Example, build_seeded, conv_bn

__all__ = [
    "InvertedResidual",
    "MobileNetV2",
    "ShuffleNet",
    "ShuffleUnit",
    "channel_shuffle",
    "mobilenetv2_tiny",
    "shufflenet_tiny",
]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (no activation after it)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, c_out, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018).

    Parameters
    ----------
    settings : sequence of (t, c, n, s)
        Expansion ratio, output channels, repeats and first stride of each stage.
    stem, last : int
        Widths of the stem conv and of the final 1x1 conv.
    num_classes : int
        Classifier outputs.
    """

    def __init__(
        self,
        settings: Sequence[tuple[int, int, int, int]],
        stem: int = 16,
        last: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, stem, 3), nn.ReLU6()]
        c = stem
        for t, c_out, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        layers += [*conv_bn(c, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Four stages (one ``t=1`` block without expansion), input ``(2, 3, 32, 32)``."""
    settings = [(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (4, 32, 1, 1)]
    return build_seeded(seed, lambda: MobileNetV2(settings, 16, 64, num_classes), 2, 3, 32, 32)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave ``groups`` channel groups: ``(B, g, C/g, H, W) -> transpose -> (B, C, H, W)``."""
    b, c, h, w = x.shape
    x = x.reshape(b, groups, c // groups, h, w).transpose(1, 2)
    return x.reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018).

    Stride 1: ``chunk`` the input in two, transform one half, ``cat``, shuffle. Stride 2: both
    branches see the whole input and each emits half of the output channels.

    Parameters
    ----------
    c_in, c_out : int
        Channels; ``c_out`` is even, and equals ``c_in`` when ``stride == 1``.
    stride : int
        1 or 2.
    pw_groups : int
        Groups of the branch's first 1x1 conv (ShuffleNetV1-style grouped pointwise conv).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, pw_groups: int = 1) -> None:
        super().__init__()
        if stride == 1 and c_in != c_out:
            raise ValueError(f"a stride-1 ShuffleUnit keeps its width, got {c_in} -> {c_out}")
        self.stride = stride
        half = c_out // 2
        branch_in = c_in if stride == 2 else half
        self.branch = nn.Sequential(
            *conv_bn(branch_in, half, 1, groups=pw_groups),
            nn.ReLU(),
            *conv_bn(half, half, 3, stride, groups=half),
            *conv_bn(half, half, 1),
            nn.ReLU(),
        )
        self.shortcut = (
            nn.Sequential(
                *conv_bn(c_in, c_in, 3, 2, groups=c_in), *conv_bn(c_in, half, 1), nn.ReLU()
            )
            if stride == 2
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch(x2)], dim=1)
        else:
            out = torch.cat([self.shortcut(x), self.branch(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """ShuffleNetV2 with an optional grouped 1x1 conv in the units and before the classifier.

    Parameters
    ----------
    repeats, widths : sequence of int
        Units and output channels per stage; each stage starts with a stride-2 unit.
    stem, last : int
        Widths of the stem conv and of the final 1x1 conv.
    pw_groups, last_groups : int
        Groups of the stride-1 units' first 1x1 conv and of the final 1x1 conv.
    num_classes : int
        Classifier outputs.
    """

    def __init__(
        self,
        repeats: Sequence[int],
        widths: Sequence[int],
        stem: int = 16,
        last: int = 64,
        pw_groups: int = 1,
        last_groups: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, stem, 3), nn.ReLU()]
        c = stem
        for n, width in zip(repeats, widths, strict=True):
            layers.append(ShuffleUnit(c, width, 2))
            layers += [ShuffleUnit(width, width, 1, pw_groups) for _ in range(n - 1)]
            c = width
        layers += [*conv_bn(c, last, 1, groups=last_groups), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def shufflenet_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Two stages of 2 units, grouped 1x1 convs (2 and 4 groups), input ``(2, 3, 32, 32)``."""
    return build_seeded(
        seed,
        lambda: ShuffleNet(
            [2, 2], [16, 32], 16, 64, pw_groups=2, last_groups=4, num_classes=num_classes
        ),
        2,
        3,
        32,
        32,
    )
