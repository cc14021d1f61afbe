"""codegen/profile.py: per-kernel times of a compiled artifact on the shapes the model uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from graphprune import codegen
from graphprune.codegen.profile import category, profile_artifact


class Stack(nn.Module):
    """conv -> relu -> three Linear+ReLU of one shape (the layers a transformer repeats)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fcs = nn.ModuleList(nn.Linear(128, 128) for _ in range(3))

    def forward(self, x):
        y = torch.relu(self.conv(x)).reshape(x.shape[0], -1, 128)
        for fc in self.fcs:
            y = torch.relu(fc(y))
        return y


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(1, 3, 16, 16)
    art = codegen.compile(model, (x,), out_dir=tmp_path_factory.mktemp("prof") / "artifact")
    return art, x, profile_artifact(art, [x], number=3, repeat=2, wall_repeat=3)


def test_every_kernel_call_is_timed_on_its_shapes(profiled):
    art, _, prof = profiled
    assert not prof.notes, prof.notes
    assert prof.kernels and all(math.isfinite(k.ms) and k.ms > 0 for k in prof.kernels)
    assert all(0 < k.best_ms <= k.ms for k in prof.kernels)
    # every profiled name is a kernel the build recorded in the manifest
    assert {k.name for k in prof.kernels} <= set(art.manifest["kernels"]), prof.kernels
    conv = [k for k in prof.kernels if k.category == "conv"]
    assert len(conv) == 1 and conv[0].calls == 1
    assert conv[0].shapes[0] == (1, 16, 16, 3) or conv[0].shapes[0] == (1, 3, 16, 16)
    gemm = [k for k in prof.kernels if k.category == "gemm"]
    assert sum(k.calls for k in gemm) == 3, gemm  # three Linears, however TVM dedups them
    assert all(k.out_elems == 8 * 16 * 16 for k in gemm)
    # sorted by total time; totals add up
    totals = [k.total_ms for k in prof.kernels]
    assert totals == sorted(totals, reverse=True)
    assert math.isclose(prof.kernel_ms, sum(totals))
    assert prof.wall_ms > 0 and prof.builtin_calls > 0
    # the call sequence: every call once, in order (the conv runs first)
    assert len(prof.sequence) == sum(k.calls for k in prof.kernels)
    assert prof.kernels[prof.sequence[0]].category in ("conv", "data movement")
    assert [prof.kernels[i].category for i in prof.sequence].count("gemm") == 3
    assert "fused" in prof.to_text(top=3) or prof.kernels[0].name in prof.to_text(top=3)


def test_profiling_leaves_the_artifact_usable(profiled):
    art, x, _ = profiled
    torch.manual_seed(0)
    model = Stack().eval()
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(art(x), want, atol=1e-4, rtol=1e-4)


def test_categories_shared_by_the_three_runtimes():
    assert category("fused_conv2d_add_relu3") == category("FusedConv") == "conv"
    assert category("fused_matmul_add2_prepacked") == category("FullyConnected") == "gemm"
    assert category("fused_fast_softmax_cast3") == category("Softmax") == "softmax"
    assert category("layer_norm") == category("LayerNormalization") == "norm"
    assert category("fused_reshape7_multiply1_fast_erf") == "elementwise"  # gelu, reshaped
    assert category("Transpose") == category("Reorder:jit_uni_f32") == "data movement"
    assert category("Convolution:brgconv_avx512_f32") == "conv"
    assert category("ScaledDotProductAttention") == category("Attention") == "attention"
    assert category("SkipLayerNormalization") == category("MVN") == "norm"
    assert category("Add") == category("fused_add_relu") == "elementwise"
