"""ONNX as exporters write it (issue 15): one fast representative per pattern.

Indices freeze what they index; legacy-exporter shape computations are folded; a dynamic batch is
kept; every written model is run; the oracle masks reductions. The full zoo × export-form matrix
is ``test_onnx_matrix.py`` (heavy).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from frontends.onnx_forms import export
from onnx import TensorProto, helper

import graphprune as gp
from graphprune import models
from graphprune.frontends.onnx.session import run_onnx
from graphprune.frontends.onnx.writeback import run_checked
from graphprune.ir.errors import CaptureError, VerificationError
from graphprune.testing.oracle import run_oracle


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name, arr):
    return onnx.numpy_helper.from_array(np.asarray(arr), name)


class _IndexedBias(torch.nn.Module):
    """x(2,3) -Linear(3,4)-> + table[idx] -Linear(4,3)-> y, ``idx`` an integer buffer (4,)."""

    def __init__(self, cast_int: bool = False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)
        self.table = torch.nn.Embedding(5, 1)
        self.cast_int = cast_int
        self.register_buffer("idx", torch.tensor([4, 3, 2, 1]))

    def forward(self, x):
        h = self.a(x)
        bias = self.idx.float() if self.cast_int else self.table(self.idx)[:, 0]
        return self.b(h + bias)


@pytest.mark.parametrize("cast_int", [False, True])
def test_indices_and_integer_constants_freeze_their_axes(cast_int):
    # The coupling rule, whichever frontend: an index's positions (and an integer tensor's) are
    # geometry. Without it the 4-axis (a's rows, idx, b's columns) would be one prunable group.
    # (ONNX capture first folds constant gathers with onnxslim: there the bias is a float
    # constant that is sliced with the channels, which the oracle checks.)
    pg = gp.capture(_IndexedBias(cast_int).eval(), (torch.randn(2, 3),))
    (g4,) = [g for g in gp.groups(pg) if g.size == 4]
    assert not g4.prunable
    assert "index" in g4.frozen_reason or "integer constant" in g4.frozen_reason


@pytest.fixture(scope="module")
def hf_swin(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(image_size=56, patch_size=4, embed_dim=24, depths=[2],
                                  num_heads=[3], window_size=7)  # fmt: skip
    cfg._attn_implementation = "eager"  # the dynamo exporter cannot trace Swin's sdpa path
    torch.manual_seed(0)
    model = transformers.SwinModel(cfg).eval()
    path = tmp_path_factory.mktemp("swin") / "swin.onnx"
    return export(model, (torch.randn(1, 3, 56, 56),), path, "dynamo")


def test_hf_swin_window_and_qkv_axes_are_not_groups(hf_swin):
    pg = gp.capture(hf_swin)
    sizes = {g.size for g in gp.groups(pg) if g.prunable}
    # window (7), window tokens (49) and the q/k/v "3" are geometry, not channels
    assert not sizes & {7, 49}, gp.explain(pg)
    res = gp.prune(hf_swin, ratio=0.3)  # runs the written model itself
    x = np.random.default_rng(0).standard_normal((1, 3, 56, 56), dtype=np.float32)
    out = run_onnx(res.model, [x])
    assert out[0].shape[-1] < 48


@pytest.mark.parametrize("name", ["swin_tiny", "shufflenet_tiny", "vit_tiny"])
def test_legacy_export_patterns_prune_exactly(name, tmp_path):
    # swin: window partition + relative-position bias; shufflenet: chunk (Shape->Gather->Div->
    # Slice) + channel shuffle; vit: Expand of a class token.
    model, inputs = models.get(name)
    pg = gp.capture(export(model, inputs, tmp_path / "m.onnx", "legacy"))
    groups = [g for g in gp.groups(pg) if g.prunable]
    assert groups
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)


def test_onnx_oracle_masks_layernorm_groups(tmp_path):
    model, inputs = models.get("vit_tiny")
    pg = gp.capture(export(model, inputs, tmp_path / "m.onnx", "dynamo"))
    reduced = [g for g in gp.groups(pg) if g.prunable and g.reductions]
    assert reduced
    for g in reduced:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)


def test_dynamic_batch_is_kept(tmp_path):
    model, inputs = models.get("resnet_tiny")
    path = export(model, inputs, tmp_path / "m.onnx", "legacy_dyn")
    res = gp.prune(path, ratio=0.3, dynamic_shapes={"batch": (1, 8)})
    dims = [d.dim_param for d in res.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch"
    with torch.no_grad():
        for b in (1, 3, 8):
            x = torch.randn(b, *inputs[0].shape[1:])
            (y,) = run_onnx(res.model, [x.numpy()])
            assert y.shape[0] == b
    pg = gp.capture(path)
    for g in [g for g in gp.groups(pg) if g.prunable][:3]:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)  # at batch 2 and 1


def test_example_inputs_fix_the_symbolic_dims(tmp_path):
    model, inputs = models.get("vit_tiny")
    path = export(model, inputs, tmp_path / "m.onnx", "legacy_dyn")
    x = torch.randn(4, *inputs[0].shape[1:])
    pg = gp.capture(path, (x,))
    assert pg.source.dynamic.sizes == {"batch": 4}
    assert pg.value(pg.inputs[0]).shape[0] == 4
    # the class token expanded over the batch is rebuilt for any batch (an Expand), not as a
    # prefix Slice of a table folded at the range's top
    assert pg.source.dynamic.broadcast
    assert not [o for o in pg.ops() if pg.op(o).attrs.get("symbolic_bounds")]
    with pytest.raises(CaptureError, match="not symbolic dims"):
        gp.capture(path, dynamic_shapes={"seq": (1, 8)})
    with pytest.raises(CaptureError, match="outside its range"):
        gp.capture(path, (x,), dynamic_shapes={"batch": (1, 2)})


def test_verification_runs_the_model_and_names_the_node():
    # Shape inference does not catch this Reshape (its target is computed); onnxruntime does.
    m = _model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Reshape", ["x", "s2"], ["y"], name="bad_view")],
        [_f("x", [2, 6])], [_f("y", None)],
        [_init("s2", np.array([4, 4], dtype=np.int64))])  # fmt: skip
    with pytest.raises(VerificationError, match="bad_view"):
        run_checked(m, {"x": np.zeros((2, 6), np.float32)})


def test_constant_node_with_value_ints():
    m = _model(
        [helper.make_node("Constant", [], ["t"], value_ints=[2, 2, 3]),
         helper.make_node("Reshape", ["x", "t"], ["y"])],
        [_f("x", [2, 6])], [_f("y", [2, 2, 3])], [])  # fmt: skip
    pg = gp.capture(m)
    assert pg.value(pg.outputs[0]).shape == (2, 2, 3)
