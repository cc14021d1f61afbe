"""DenseNet, for the many-input ``cat`` case.

Each dense layer reads the ``cat`` of every earlier output along channels, so one producer's
channels reach many consumers at different offsets.

Factories return ``(model, example_inputs)`` built under ``seed`` in eval mode (see
:mod:`graphprune.models.cnn_base`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphprune.models.cnn_base import Example, build_seeded

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "densenet_tiny",
]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv over the ``cat`` of every earlier feature map."""

    def __init__(self, c_in: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth),
            nn.ReLU(),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.body(torch.cat(features, dim=1))


class DenseBlock(nn.Module):
    """``n`` dense layers; the output is the ``cat`` of the input and all their outputs."""

    def __init__(self, n: int, c_in: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(c_in + i * growth, growth) for i in range(n))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, dim=1)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) with transitions halving channels and resolution.

    Parameters
    ----------
    blocks : sequence of int
        Dense layers per block.
    growth, stem : int
        Growth rate and stem conv width.
    num_classes : int
        Classifier outputs.
    """

    def __init__(
        self, blocks: Sequence[int], growth: int = 8, stem: int = 16, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, padding=1, bias=False)]
        c = stem
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth))
            c += n * growth
            if i != len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                    nn.Conv2d(c, c // 2, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def densenet_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Two dense blocks of 3 layers, growth 8, input ``(2, 3, 32, 32)``."""
    return build_seeded(seed, lambda: DenseNet([3, 3], 8, 16, num_classes), 2, 3, 32, 32)
