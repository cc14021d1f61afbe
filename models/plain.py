"""Plain conv stacks flattened into a classifier.

* ``VGGBN``: ``flatten`` into a ``Linear`` with spatial size > 1, one channel = ``H*W`` features.
* ``DigitsCNN``: a small classifier for the 8x8 sklearn digits, used where accuracy matters
  (trained by :mod:`graphprune.models.digits`).

Factories return ``(model, example_inputs)`` built under ``seed`` in eval mode (see
:mod:`graphprune.models.cnn_base`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from graphprune.models.cnn_base import Example, build_seeded, conv_bn

__all__ = [
    "VGGBN",
    "DigitsCNN",
    "digits_cnn",
    "vgg_tiny",
]


class VGGBN(nn.Module):
    """VGG with BatchNorm; the classifier flattens a ``C x H x W`` map with ``H, W > 1``.

    Parameters
    ----------
    cfg : sequence of int or "M"
        Conv widths, ``"M"`` for a 2x2 max-pool.
    in_size : int
        Input height and width, to size the first ``Linear``.
    hidden, num_classes : int
        Classifier widths.
    """

    def __init__(
        self, cfg: Sequence[int | str], in_size: int = 32, hidden: int = 64, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = 3, in_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [*conv_bn(c, int(v), 3), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Five conv-BN-ReLU layers, three pools, a flatten of ``64x4x4``, input ``(2, 3, 32, 32)``."""
    cfg = [16, "M", 32, 32, "M", 64, 64, "M"]
    return build_seeded(seed, lambda: VGGBN(cfg, 32, 64, num_classes), 2, 3, 32, 32)


class DigitsCNN(nn.Module):
    """Small classifier for the 8x8 single-channel sklearn digits (10 classes).

    Two 3x3 convs, a 2x2 pool and a flatten of ``32 x 4 x 4`` into a two-layer classifier.
    """

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_cnn(seed: int = 0) -> Example:
    """Untrained ``DigitsCNN``, input ``(2, 1, 8, 8)``."""
    return build_seeded(seed, DigitsCNN, 2, 1, 8, 8)
