"""Compiled artifacts against PyTorch, through both frontends (atol=rtol=1e-4, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import Attention, ConvBlock, TwoOutputs, seeded

from graphprune import codegen
from graphprune.runtime import load

SMALL = {
    "convblock": lambda: (seeded(ConvBlock), (torch.randn(2, 3, 16, 16),)),
    # A structurally pruned ConvBlock is a narrower dense one: odd widths exercise the tail paths.
    "convblock_pruned": lambda: (seeded(ConvBlock, 7), (torch.randn(2, 3, 15, 15),)),
    "attention": lambda: (seeded(Attention), (torch.randn(2, 10, 32),)),
    "two_outputs": lambda: (seeded(TwoOutputs), (torch.randn(3, 8),)),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_torch_frontend_matches(name, artifact_dir):
    model, inputs = SMALL[name]()
    art = codegen.compile(model, inputs, out_dir=artifact_dir)
    assert_matches(art(*inputs), torch_outputs(model, inputs))
    assert art.manifest["frontend"] == "torch"


@pytest.mark.parametrize("name", ["convblock", "attention"])
def test_onnx_frontend_matches(name, tmp_path):
    model, inputs = SMALL[name]()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, inputs, str(path), dynamo=False)
    art = codegen.compile(str(path), out_dir=tmp_path / "art")
    assert art.manifest["frontend"] == "onnx"
    assert_matches(art(*[x.numpy() for x in inputs]), torch_outputs(model, inputs))


def test_kernel_choice_recorded_per_layer(artifact_dir):
    model, inputs = SMALL["convblock"]()
    art = codegen.compile(model, inputs, out_dir=artifact_dir)
    kernels = art.manifest["kernels"]
    contractions = [k for k, v in kernels.items() if v["rule"] == "Contraction"]
    # stem (with BN + ReLU epilogue), depthwise, pointwise, stride-2 conv, Linear
    assert len(contractions) == 5, kernels
    assert all(v["sparsity"] == "dense" for v in kernels.values())
    assert any("conv2d" in k and "relu" in k for k in contractions)


def test_stock_schedule_is_the_same_function(artifact_dir):
    model, inputs = SMALL["convblock"]()
    ours = codegen.compile(model, inputs, out_dir=artifact_dir)
    stock = codegen.compile(model, inputs, out_dir=artifact_dir.with_name("stock"), schedule="stock")
    np.testing.assert_allclose(ours(*inputs), stock(*inputs), atol=1e-4, rtol=1e-4)
    assert set(v["rule"] for v in stock.manifest["kernels"].values()) <= {"unscheduled"}


def test_torch_and_numpy_inputs_agree(artifact_dir):
    model, inputs = SMALL["two_outputs"]()
    art = codegen.compile(model, inputs, out_dir=artifact_dir)
    a, b = art(*inputs), art(*[x.numpy() for x in inputs])
    assert isinstance(a, tuple) and len(a) == 2
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert load(art.path)(*inputs)[0].shape == (3, 5)
