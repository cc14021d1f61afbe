"""ResNet, for the residual coupling case.

``BasicBlock`` and ``Bottleneck`` blocks add their output to an identity or a 1x1 conv + BN
downsample shortcut, so a stage's output channels form one group across all its blocks.
``resnet50`` is the full-size model, for benchmarks only.

Factories return ``(model, example_inputs)`` built under ``seed`` in eval mode (see
:mod:`graphprune.models.cnn_base`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphprune.models.cnn_base import Example, build_seeded, conv_bn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet50",
    "resnet_bottleneck_tiny",
    "resnet_tiny",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = self.make_body(c_in, width, stride)
        self.downsample = (
            nn.Sequential(*conv_bn(c_in, c_out, 1, stride))
            if stride != 1 or c_in != c_out
            else None
        )

    def make_body(self, c_in: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*conv_bn(c_in, width, 3, stride), nn.ReLU(), *conv_bn(width, width, 3))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + identity)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (carrying the stride, as in ResNet v1.5), 1x1 expand by 4."""

    expansion = 4

    def make_body(self, c_in: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *conv_bn(c_in, width, 1),
            nn.ReLU(),
            *conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *conv_bn(width, width * self.expansion, 1),
        )


class ResNet(nn.Module):
    """ResNet (He et al. 2016) over any block type.

    Parameters
    ----------
    block : type
        ``BasicBlock`` or ``Bottleneck``.
    layers : sequence of int
        Blocks per stage; stage ``i > 0`` starts with a stride-2 block.
    widths : sequence of int
        Bottleneck width per stage (output channels are ``width * block.expansion``).
    num_classes : int
        Classifier outputs.
    imagenet_stem : bool
        7x7/2 conv + 3x3/2 max-pool (224x224 inputs); otherwise one 3x3/1 conv (32x32 inputs).

    Examples
    --------
    >>> model = ResNet(BasicBlock, [1, 1], [8, 16], num_classes=10).eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        block: type[BasicBlock],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        c = widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(
                *conv_bn(3, c, 7, 2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
            )
        else:
            self.stem = nn.Sequential(*conv_bn(3, c, 3), nn.ReLU())
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(c, width, stride=2 if i > 0 and j == 0 else 1))
                c = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """BasicBlock ResNet, one block per stage, widths 8..64, input ``(2, 3, 32, 32)``."""
    return build_seeded(
        seed, lambda: ResNet(BasicBlock, [1, 1, 1, 1], [8, 16, 32, 64], num_classes), 2, 3, 32, 32
    )


def resnet_bottleneck_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Bottleneck ResNet, two blocks in the first stage, widths 4..16, input ``(2, 3, 32, 32)``."""
    return build_seeded(
        seed, lambda: ResNet(Bottleneck, [2, 1, 1], [4, 8, 16], num_classes), 2, 3, 32, 32
    )


def resnet50(seed: int = 0, num_classes: int = 1000) -> Example:
    """True ResNet-50 shape (25.6M parameters), input ``(2, 3, 224, 224)``; for benchmarks."""
    return build_seeded(
        seed,
        lambda: ResNet(
            Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, imagenet_stem=True
        ),
        2,
        3,
        224,
        224,
    )
