"""ONNX opsets 11 to 21 and fp16 ONNX: one fast representative each (the full matrix is
``test_onnx_matrix.py``, heavy).

Opset 11 is the oldest the legacy exporter still writes and the most different from 17: Slice,
Squeeze, Unsqueeze, Split and ReduceMean take their axes as attributes, not inputs, and there is
no LayerNormalization (a ViT's LayerNorm is ReduceMean/Sub/Pow/Sqrt/Div). fp16: the model is
exported after ``model.half()``; weights, activations and the oracle's masked reductions are fp16.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from frontends.onnx_forms import signatures

import graphprune as gp
from graphprune import models
from graphprune.ir.errors import CaptureError
from graphprune.testing.oracle import run_oracle


def export_legacy(model, inputs, path, opset: int = 17, half: bool = False) -> str:
    """The legacy exporter at ``opset``; ``half``: the model and its float inputs in fp16."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if half:
        model = model.half()
        inputs = tuple(x.half() if x.is_floating_point() else x for x in inputs)
    names = [f"input_{i}" for i in range(len(inputs))]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            torch.no_grad():  # fmt: skip
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, opset_version=opset,
                          input_names=names)  # fmt: skip
    return str(path)


def _ops(path: str) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_opset_11_vit_layernorm_decomposed(tmp_path):
    model, inputs = models.get("vit_tiny")
    path = export_legacy(model, inputs, tmp_path / "vit11.onnx", opset=11)
    assert onnx.load(path).opset_import[0].version == 11
    assert "LayerNormalization" not in _ops(path) and "ReduceMean" in _ops(path)
    pg = gp.capture(path)
    assert Counter(signatures(gp.capture(model, inputs))) <= Counter(signatures(pg))
    res = gp.prune(path, ratio=0.3)
    assert res.model.opset_import[0].version == 11
    onnx.checker.check_model(res.model)
    groups = [g for g in gp.groups(pg) if g.prunable]
    # the hidden (residual) stream goes through the decomposed LayerNorm's ReduceMeans
    hidden = max(groups, key=lambda g: len(g.members))
    for g in (hidden, groups[0]):
        run_oracle(pg, g.id).assert_close(atol=5e-5, rtol=1e-4)


def test_opset_21_resnet(tmp_path):
    model, inputs = models.get("resnet_tiny")
    path = export_legacy(model, inputs, tmp_path / "r21.onnx", opset=21)
    pg = gp.capture(path)
    assert sum(g.prunable for g in gp.groups(pg)) == 8  # as from torch
    res = gp.prune(path, ratio=0.5)
    assert res.model.opset_import[0].version == 21
    assert res.report.params_after < res.report.params_before


def test_fp16_vit(tmp_path):
    model, inputs = models.get("vit_tiny")
    path = export_legacy(model, inputs, tmp_path / "vit16.onnx", half=True)
    weights = [t for t in onnx.load(path).graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    pg = gp.capture(path)
    groups = [g for g in gp.groups(pg) if g.prunable]
    assert len(groups) == 7  # as fp32
    res = gp.prune(path, ratio=0.3)
    kept = [t for t in res.model.graph.initializer if len(t.dims) == 2]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in kept)
    for g in groups[:3]:
        r = run_oracle(pg, g.id)
        assert r.reference[0].dtype == np.float64 and np.isfinite(r.reference[0]).all()
        r.assert_close(atol=1e-2, rtol=1e-2)  # fp16 arithmetic


def test_exporter_output_that_does_not_run_is_refused_as_such():
    # What transformers' BERT becomes after .half() and the legacy exporter: LayerNormalization
    # with an fp16 input and an fp32 scale, which onnx.checker passes and onnxruntime rejects.
    # That is the input's fault, not the pruning's: the refusal says so and names the node.
    #   x(2,4) fp16 -MatMul w1(4,8)-> LayerNormalization(scale, bias fp32) -MatMul w2(8,3)-> y
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(d), n) for n, s, d in [
        ("w1", (4, 8), np.float16), ("scale", (8,), np.float32), ("bias", (8,), np.float32),
        ("w2", (8, 3), np.float16)]]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], name="ln"),
             helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2")]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16,
                                                                     [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    with pytest.raises(CaptureError, match=r"input ONNX model itself fails.*'ln'"):
        gp.prune(model, ratio=0.5)


def test_opset_11_split_sizes_attribute():
    # Before opset 13 Split's sizes are an attribute (GPT-2's c_attn split at opset 11/12):
    # read as the op's sizes and rewritten after pruning.
    #   x(2,4) -MatMul w1(4,6)-> Relu -Split(axis 1, split=[2, 4])-> a -MatMul wa(2,3)-+-> y
    #                                                                 b -MatMul wb(4,3)-+
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (4, 6)), ("wa", (2, 3)), ("wb", (4, 3))]]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Split", ["r"], ["a", "b"], name="split", axis=1, split=[2, 4]),
             helper.make_node("MatMul", ["a", "wa"], ["ya"], name="fca"),
             helper.make_node("MatMul", ["b", "wb"], ["yb"], name="fcb"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    pg = gp.capture(model)
    assert pg.op("split").attrs["uniform"] is False
    groups = [g for g in gp.groups(pg) if g.prunable]
    assert sorted(g.size for g in groups) == [2, 4]
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=1e-5, rtol=1e-5)
    res = gp.prune(model, ratio=0.5)
    split = next(n for n in res.model.graph.node if n.op_type == "Split")
    sizes = list(next(a for a in split.attribute if a.name == "split").ints)
    w1 = next(t for t in res.model.graph.initializer if t.name == "w1")
    assert sizes == [1, 2] and sum(sizes) == w1.dims[1]
