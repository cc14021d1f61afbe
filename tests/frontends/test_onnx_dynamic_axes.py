"""ONNX captures carry the same dynamic-axes record as torch captures (issues 14 and 15).

``pg.dynamic_axes`` (input, axis, dim name, range, example size), ``pg.static_axes`` (a dim_param
fixed, and why) and ``Value.symbols`` (each axis's size as an expression over the dims), filled
from a legacy export's ``dim_param``s; the prune report lists them as for torch, and
``passes.cost.count(pg, at=...)`` costs the model at other sizes.
"""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch
from frontends.onnx_forms import export
from graphprune.passes import cost

import graphprune as gp
from graphprune import models
from graphprune.ir.graph import DynamicAxis


@pytest.fixture(scope="module")
def resnet_dyn(tmp_path_factory):
    model, inputs = models.get("resnet_tiny")
    return export(model, inputs, tmp_path_factory.mktemp("r") / "m.onnx", "legacy_dyn")


@pytest.fixture(scope="module")
def bert_dyn(tmp_path_factory):
    """hf_bert_tiny's encoder on ``input_ids`` alone, batch and sequence dynamic (legacy
    exporter; with an ``attention_mask`` too: ``test_onnx_sequence.py``)."""
    from graphprune.models.hf import TensorOutputs

    model, inputs = models.get("hf_bert_tiny")
    wrapped = TensorOutputs(model.model, ("input_ids",), ("last_hidden_state",)).eval()
    path = tmp_path_factory.mktemp("b") / "bert.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(wrapped, (inputs[0],), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["hidden"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "hidden": {0: "batch", 1: "seq"}})  # fmt: skip
    return str(path)


def test_dynamic_batch_cnn_axes_symbols_and_cost(resnet_dyn):
    pg = gp.capture(resnet_dyn)
    (axis,) = pg.dynamic_axes
    assert (axis.input, axis.axis, axis.name, axis.min, axis.max, axis.size) == (
        "input_0", 0, "batch", 1, 64, 2)
    assert "default range" in axis.note and pg.static_axes == {}
    (out,) = pg.outputs
    assert pg.value(out).symbols == ("batch", None)
    assert pg.shape_at(out, {"batch": 5}) == (5, pg.value(out).shape[1])
    # every activation follows the batch; parameters never have symbols
    acts = [v for v in pg.values() if pg.value(v).role != "param"]
    assert all(pg.value(v).symbols and pg.value(v).symbols[0] == "batch" for v in acts)
    assert not any(pg.value(v).symbols for v in pg.params())
    one, four = cost.count(pg, at={"batch": 1}).macs, cost.count(pg, at={"batch": 4}).macs
    assert one > 0 and four == 4 * one
    assert cost.count(pg).macs == 2 * one  # the analysed size, batch 2


def test_given_range_is_recorded_and_reported_as_for_torch(resnet_dyn):
    res = gp.prune(resnet_dyn, ratio=0.3, dynamic_shapes={"batch": (1, 8)})
    assert res.report.dynamic_axes == [DynamicAxis("input_0", 0, "batch", 1, 8, 2)]
    text = res.report.to_text()
    assert "dynamic axes: input_0[0] = batch in [1, 8]" in text
    assert "default range" not in text
    # the torch capture of the same model words its axis the same way
    model, inputs = models.get("resnet_tiny")
    torch_text = gp.prune(model, inputs, ratio=0.3).report.to_text()
    line = next(ln for ln in torch_text.splitlines() if ln.startswith("dynamic axes: "))
    assert line.split(" = ")[1].startswith("batch in [1, ")


def test_range_fixing_a_dim_makes_it_static_with_why(resnet_dyn):
    pg = gp.capture(resnet_dyn, dynamic_shapes={"batch": (3, 3)})
    assert pg.dynamic_axes == []
    assert "dynamic_shapes" in pg.static_axes["input_0[0]"]
    assert not any(pg.value(v).symbols for v in pg.values())


def test_batch_and_sequence_of_a_transformer(bert_dyn):
    pg = gp.capture(bert_dyn, dynamic_shapes={"batch": (1, 8), "seq": (1, 32)})
    assert [(a.input, a.axis, a.name, a.min, a.max, a.size) for a in pg.dynamic_axes] == [
        ("input_ids", 0, "batch", 1, 8, 2), ("input_ids", 1, "seq", 1, 32, 2)]
    (out,) = pg.outputs
    assert pg.value(out).symbols == ("batch", "seq", None)
    # a flattened (batch*seq, features) Gemm operand keeps the product, not a sum
    flat = [v for v in pg.values() if "batch*seq" in (pg.value(v).symbols or ())]
    assert flat
    assert pg.shape_at(flat[0], {"batch": 3, "seq": 7})[0] == 21
    at = {"seq": 16}
    one = cost.count(pg, at={**at, "batch": 1}).macs
    assert cost.count(pg, at={**at, "batch": 4}).macs == 4 * one
    # attention is quadratic in the sequence: doubling it more than doubles the MACs
    assert cost.count(pg, at={"batch": 1, "seq": 32}).macs > 2 * one


def test_static_export_has_no_dynamic_axes(tmp_path):
    model, inputs = models.get("resnet_tiny")
    pg = gp.capture(export(model, inputs, tmp_path / "m.onnx", "legacy"))
    assert pg.dynamic_axes == [] and pg.static_axes == {}
    assert not any(pg.value(v).symbols for v in pg.values())
    assert cost.count(pg, at={"batch": 4}).macs == cost.count(pg).macs
