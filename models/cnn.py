"""Convolutional models of the zoo, each chosen for a structural coupling case.

The coupling analysis (:mod:`graphprune.passes.coupling`) has to group channels that must be
removed together. Every model exists to put one or more such cases in front of it; they live in
one module per family and are all importable from here:

* :mod:`~graphprune.models.resnet`: ``ResNet`` (residual ``add``, 1x1 conv + BN downsample).
* :mod:`~graphprune.models.plain`: ``VGGBN`` (``flatten`` into a ``Linear``) and ``DigitsCNN``
  (the 8x8 sklearn digits classifier).
* :mod:`~graphprune.models.mobile`: ``MobileNetV2`` (depthwise conv, ReLU6) and ``ShuffleNet``
  (``chunk`` + ``cat`` + channel shuffle, grouped 1x1 convs).
* :mod:`~graphprune.models.densenet`: ``DenseNet`` (many-input ``cat``).
* :mod:`~graphprune.models.unet`: ``UNet`` (skip ``cat``, ``ConvTranspose2d``, ``GroupNorm``).
"""

from __future__ import annotations

from graphprune.models.densenet import DenseBlock, DenseLayer, DenseNet, densenet_tiny
from graphprune.models.mobile import (
    InvertedResidual,
    MobileNetV2,
    ShuffleNet,
    ShuffleUnit,
    channel_shuffle,
    mobilenetv2_tiny,
    shufflenet_tiny,
)
from graphprune.models.plain import VGGBN, DigitsCNN, digits_cnn, vgg_tiny
from graphprune.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet50,
    resnet_bottleneck_tiny,
    resnet_tiny,
)
from graphprune.models.unet import UNet, unet_tiny

__all__ = [
    "VGGBN",
    "BasicBlock",
    "Bottleneck",
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "DigitsCNN",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "ShuffleNet",
    "ShuffleUnit",
    "UNet",
    "channel_shuffle",
    "densenet_tiny",
    "digits_cnn",
    "mobilenetv2_tiny",
    "resnet50",
    "resnet_bottleneck_tiny",
    "resnet_tiny",
    "shufflenet_tiny",
    "unet_tiny",
    "vgg_tiny",
]
