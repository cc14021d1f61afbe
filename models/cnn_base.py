"""What the convolutional zoo models share: seeded construction and the conv + BN pair.

:func:`build_seeded` builds a model and its example input under ``seed`` without touching the
global RNG. Norm layers get random affine parameters and running statistics, so a pruned
channel's bias visibly flows on through BN (an all-default BN would hide a consumer-side bug in
the oracle tests). Example inputs use batch 2: with batch 1 ``torch.export`` specialises the
batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["Example", "build_seeded", "conv_bn"]

Example = tuple[nn.Module, tuple[Tensor, ...]]


def build_seeded(seed: int, make: Callable[[], nn.Module], *input_shape: int) -> Example:
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


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free ``k x k`` conv ("same" padding) and its BatchNorm."""
    return [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
