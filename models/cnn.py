"""Convolutional models of the zoo, each chosen for a structural coupling case.

The coupling analysis (``passes/coupling.py``) has to group channels that must be removed
together. Every model here exists to put one or more such cases in front of it:

* ``ResNet``: residual ``add`` (BasicBlock and Bottleneck) and a 1x1 conv + BN downsample
  shortcut, so a stage's output channels form one group across all its blocks.
* ``VGGBN``: ``flatten`` into a ``Linear`` with spatial size > 1, one channel = ``H*W`` features.
* ``MobileNetV2``: depthwise conv (``groups == channels``) ties input to output channels;
  residual add only between stride-1 blocks of equal width; ReLU6.
* ``ShuffleNet``: ``chunk`` + ``cat`` + channel shuffle (``reshape``/``transpose``/``reshape``)
  and grouped 1x1 convs (``groups`` of 2 and 4).
* ``DenseNet``: many-input ``cat`` along channels, each layer reading every earlier output.
* ``UNet``: encoder-decoder skip ``cat``, ``ConvTranspose2d``, upsample + conv, ``GroupNorm``.
* ``DigitsCNN``: a small classifier for the 8x8 sklearn digits, used where accuracy matters.

Factories return ``(model, example_inputs)`` with the model in eval mode, built under
``seed`` without touching the global RNG. Norm layers get random affine parameters and running
statistics, so a pruned channel's bias visibly flows on through BN (an all-default BN would hide
a consumer-side bug in the oracle tests). Example inputs use batch 2: with batch 1
``torch.export`` specialises the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "DigitsCNN",
    "MobileNetV2",
    "ResNet",
    "ShuffleNet",
    "UNet",
    "VGGBN",
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

Example = tuple[nn.Module, tuple[Tensor, ...]]


def _build(seed: int, make: Callable[[], nn.Module], *input_shape: int) -> Example:
    """Build ``make()`` and a random input of ``input_shape`` under ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(*input_shape)
    return model.eval(), (x,)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


# --------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = self.make_body(c_in, width, stride)
        self.downsample = (
            nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
            if stride != 1 or c_in != c_out
            else None
        )

    def make_body(self, c_in: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *_conv_bn(c_in, width, 3, stride), nn.ReLU(), *_conv_bn(width, width, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + identity)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (carrying the stride, as in ResNet v1.5), 1x1 expand by 4."""

    expansion = 4

    def make_body(self, c_in: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *_conv_bn(c_in, width, 1),
            nn.ReLU(),
            *_conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *_conv_bn(width, width * self.expansion, 1),
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
                *_conv_bn(3, c, 7, 2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
            )
        else:
            self.stem = nn.Sequential(*_conv_bn(3, c, 3), nn.ReLU())
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
    return _build(
        seed, lambda: ResNet(BasicBlock, [1, 1, 1, 1], [8, 16, 32, 64], num_classes), 2, 3, 32, 32
    )


def resnet_bottleneck_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Bottleneck ResNet, two blocks in the first stage, widths 4..16, input ``(2, 3, 32, 32)``."""
    return _build(
        seed, lambda: ResNet(Bottleneck, [2, 1, 1], [4, 8, 16], num_classes), 2, 3, 32, 32
    )


def resnet50(seed: int = 0, num_classes: int = 1000) -> Example:
    """True ResNet-50 shape (25.6M parameters), input ``(2, 3, 224, 224)``; for benchmarks."""
    return _build(
        seed,
        lambda: ResNet(
            Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, imagenet_stem=True
        ),
        2,
        3,
        224,
        224,
    )


# ------------------------------------------------------------------------------------------ VGG


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
                layers += [*_conv_bn(c, int(v), 3), nn.ReLU()]
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
    return _build(seed, lambda: VGGBN(cfg, 32, 64, num_classes), 2, 3, 32, 32)


# ---------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (no activation after it)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, c_out, 1)
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
        layers: list[nn.Module] = [*_conv_bn(3, stem, 3), nn.ReLU6()]
        c = stem
        for t, c_out, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        layers += [*_conv_bn(c, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Four stages (one ``t=1`` block without expansion), input ``(2, 3, 32, 32)``."""
    settings = [(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (4, 32, 1, 1)]
    return _build(seed, lambda: MobileNetV2(settings, 16, 64, num_classes), 2, 3, 32, 32)


# ------------------------------------------------------------------------------------ ShuffleNet


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
            *_conv_bn(branch_in, half, 1, groups=pw_groups),
            nn.ReLU(),
            *_conv_bn(half, half, 3, stride, groups=half),
            *_conv_bn(half, half, 1),
            nn.ReLU(),
        )
        self.shortcut = (
            nn.Sequential(
                *_conv_bn(c_in, c_in, 3, 2, groups=c_in), *_conv_bn(c_in, half, 1), nn.ReLU()
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
        layers: list[nn.Module] = [*_conv_bn(3, stem, 3), nn.ReLU()]
        c = stem
        for n, width in zip(repeats, widths, strict=True):
            layers.append(ShuffleUnit(c, width, 2))
            layers += [ShuffleUnit(width, width, 1, pw_groups) for _ in range(n - 1)]
            c = width
        layers += [*_conv_bn(c, last, 1, groups=last_groups), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def shufflenet_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Two stages of 2 units, grouped 1x1 convs (2 and 4 groups), input ``(2, 3, 32, 32)``."""
    return _build(
        seed,
        lambda: ShuffleNet(
            [2, 2], [16, 32], 16, 64, pw_groups=2, last_groups=4, num_classes=num_classes
        ),
        2,
        3,
        32,
        32,
    )


# -------------------------------------------------------------------------------------- DenseNet


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
    return _build(seed, lambda: DenseNet([3, 3], 8, 16, num_classes), 2, 3, 32, 32)


# ------------------------------------------------------------------------------------------ UNet


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
    return _build(seed, lambda: UNet(3, num_classes, 8), 2, 3, 32, 32)


# ---------------------------------------------------------------------------------------- Digits


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
    return _build(seed, DigitsCNN, 2, 1, 8, 8)
