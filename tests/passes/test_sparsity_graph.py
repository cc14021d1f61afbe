"""Sparsity on the IR: gp.sparsify records its masks on ``res.graph`` (a PruneGraph of the model),
the frontends write them, and the passes only compute.

Checked for torch (several methods and patterns) and ONNX: ``res.graph.masks == res.masks``, each
mask has exactly the requested pattern (N:M: every M-block along the reduction dim keeps at most
N; unstructured, per layer: exactly ``round(s * size)`` pruned), the returned weights are zero
outside the masks and unchanged inside, and the user's model is untouched without ``inplace``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import graphprune as gp
from graphprune.api.sparsify import sparsify, sparsify_gradually
from graphprune.frontends.onnx import masks as onnx_masks
from graphprune.frontends.torch import masks as torch_masks
from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.config import validate_config
from graphprune.passes.sparsity.patterns import prune_count
from graphprune.passes.sparsity.sparsify import compute_masks
from helpers import export_onnx


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class _Stack(nn.Module):
    """embed -> 3 residual blocks (a ModuleList: sequential calibration) -> head."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _stack():
    torch.manual_seed(0)
    return _Stack()


def _x(n=3):
    return [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _onnx_model():
    """x(2,16) -> MatMul W1(16,8) -> Gemm W2(4,8) transB=1 -> y(2,4)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
         helper.make_node("Gemm", ["h", "W2"], ["y"], name="gemm", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _as2d(mask: np.ndarray, reduction_axis: int = 1) -> np.ndarray:
    """``(out, reduction)`` view: torch weights reduce over everything after dim 0; an ONNX
    MatMul weight ``(K, N)`` over dim 0."""
    return mask.T if reduction_axis == 0 else mask.reshape(mask.shape[0], -1)


def _assert_pattern(mask2d: np.ndarray, pattern: str, sparsity: float | None) -> None:
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        assert (mask2d.reshape(mask2d.shape[0], -1, m).sum(-1) <= n).all()
    else:
        assert int((~mask2d).sum()) == prune_count(sparsity, mask2d.size)


def _assert_graph_masks(res) -> None:
    assert res.graph is not None, res.report.notes
    assert set(res.graph.masks) == set(res.masks) and res.masks
    for name, m in res.masks.items():
        got = res.graph.masks[name]
        assert got.dtype == np.bool_ and got.shape == tuple(res.graph.weights[name].shape)
        np.testing.assert_array_equal(got, m.numpy())


CASES = [
    ("magnitude", "unstructured", 0.6, False),
    ("magnitude", "2:4", None, False),
    ("random", "4:8", None, False),
    ("wanda", "2:4", None, True),
    ("sparsegpt", "2:4", None, True),
    ("obd", "unstructured", 0.3, True),
]


@pytest.mark.parametrize("method, pattern, sparsity, calibrated", CASES)
@pytest.mark.parametrize("net", ["stack", "convnet"])
def test_torch_graph_masks_equal_result_masks_with_the_pattern(net, method, pattern, sparsity,
                                                               calibrated):
    if net == "stack":
        model, x = _stack(), _x()
    else:
        model, x = _convnet(), [torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(i))
                                for i in range(2)]
    before = _params(model)
    res = sparsify(model, x[0], sparsity=sparsity, pattern=pattern, method=method,
                   calib=x if calibrated else None, exclude=[])
    _assert_graph_masks(res)
    for name, m in res.masks.items():
        _assert_pattern(_as2d(m.numpy()), pattern, sparsity if method != "wanda" else None)
    # The user's model is untouched; the result's masked weights are exact zeros.
    assert res.model is not model
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
    after = dict(res.model.named_parameters())
    for name, m in res.masks.items():
        assert (after[name][~m] == 0).all()
        if method != "sparsegpt":  # SparseGPT also updates the kept weights
            assert torch.equal(after[name][m], before[name][m])


def test_unstructured_counts_are_exact_per_comparison_group():
    """Wanda compares within each output row: every row prunes exactly round(s * in)."""
    res = sparsify(_stack(), sparsity=0.25, method="wanda", calib=_x(), exclude=[])
    _assert_graph_masks(res)
    for m in res.graph.masks.values():
        assert ((~m).sum(1) == prune_count(0.25, m.shape[1])).all()


def test_graph_is_the_callers_when_given_and_its_masks_are_replaced():
    model, x = _stack(), _x()
    pg = gp.capture(model, (x[0],))
    pg.masks["head.weight"] = np.ones((2, 8), bool)  # from an earlier run: replaced
    res = gp.sparsify(model, x[0], pattern="2:4", graph=pg)
    assert res.graph is pg
    _assert_graph_masks(res)
    assert "head.weight" not in pg.masks  # the head is excluded by default


def test_inplace_writes_the_model_and_records_the_graph():
    model, x = _stack(), _x()
    res = gp.sparsify(model, x[0], method="sparsegpt", calib=x, inplace=True)
    assert res.model is model
    _assert_graph_masks(res)
    params = dict(model.named_parameters())
    for name, m in res.masks.items():
        assert (params[name][~m] == 0).all()


@pytest.mark.parametrize("bad", ["onnx-graph", "other-shapes"])
def test_graph_of_another_model_is_refused_before_anything_is_written(bad):
    model, x = _stack(), _x()
    before = _params(model)
    if bad == "onnx-graph":
        pg, match = gp.capture(_onnx_model()), "the model is torch, the graph onnx"
    else:
        pg, match = gp.capture(_Stack(d=16), (x[0],)), "shape"  # same names, other shapes
    with pytest.raises(ConfigError, match=match):
        gp.sparsify(model, x[0], graph=pg, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
    assert not pg.masks


class _DataDependent(nn.Module):
    """Branches on a tensor's value: neither torch.export nor torch.fx can capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.b(h)


def test_model_that_does_not_capture_is_still_sparsified_without_a_graph():
    torch.manual_seed(0)
    model, x = _DataDependent(), torch.randn(4, 8)
    with pytest.raises(gp.CaptureError):
        gp.capture(model, (x,))
    res = gp.sparsify(model, x, sparsity=0.5)
    assert res.graph is None
    assert any(n.startswith("no graph: capture failed (CaptureError") for n in res.report.notes)
    assert set(res.masks) == {"a.weight"}
    assert (res.model.a.weight[~res.masks["a.weight"]] == 0).all()


def test_no_inputs_no_graph_and_the_report_says_why():
    res = gp.sparsify(_stack(), pattern="2:4")
    assert res.graph is None and res.masks
    assert any("no example_inputs" in n for n in res.report.notes)


def test_first_calib_batch_captures_the_graph():
    res = gp.sparsify(_stack(), method="wanda", calib=_x())
    _assert_graph_masks(res)


def test_gradual_schedule_records_its_final_masks():
    model, x = _stack(), _x()
    res = sparsify_gradually(model, 0.75, steps=3, example_inputs=x[0], method="magnitude")
    _assert_graph_masks(res)
    for m in res.graph.masks.values():
        assert int((~m).sum()) == prune_count(0.75, m.size)


# ---- ONNX --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("unstructured", 0.25)])
def test_onnx_records_masks_on_its_graph(pattern, sparsity):
    model = _onnx_model()
    orig = model.SerializeToString()
    res = gp.sparsify(model, pattern=pattern, sparsity=sparsity, exclude=[])
    assert model.SerializeToString() == orig
    assert res.graph.frontend == "onnx"
    _assert_graph_masks(res)
    # MatMul's W1 is (K, N): reduction axis 0; Gemm transB's W2 is (N, K): axis 1.
    _assert_pattern(_as2d(res.graph.masks["W1"], 0), pattern, sparsity)
    _assert_pattern(_as2d(res.graph.masks["W2"], 1), pattern, sparsity)
    w = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    for name, m in res.graph.masks.items():
        assert (w[name][~m] == 0).all()


def test_onnx_export_of_a_torch_model_records_masks_under_initializer_names():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    proto = export_onnx(net.eval(), (torch.randn(2, 16),))
    inits = {i.name for i in proto.graph.initializer}
    res = gp.sparsify(proto, pattern="2:4")
    _assert_graph_masks(res)
    assert set(res.masks) <= inits and len(res.masks) == 2  # the head is excluded
    assert not any("no graph" in n for n in res.report.notes)


def test_onnx_graph_given_must_be_onnx():
    pg = gp.capture(_stack(), (_x()[0],))
    with pytest.raises(ConfigError, match="the model is onnx, the graph torch"):
        gp.sparsify(_onnx_model(), graph=pg)


# ---- the passes compute, the frontends write ---------------------------------------------


def test_pass_computes_without_writing():
    model = _stack()
    before = _params(model)
    cfg, calib = validate_config(method="sparsegpt", calib=_x())
    found = compute_masks(model, cfg, calib=calib, flatten_outputs=list)
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
    assert set(found.values) == set(found.masks)  # SparseGPT reconstructs every layer it prunes
    out = torch_masks.apply_masks(model, found.masks, values=found.values)
    for name, m in found.masks.items():
        w = dict(out.named_parameters())[name]
        torch.testing.assert_close(w, found.values[name] * m)


def test_torch_writer_checks_every_mask_before_writing():
    model = _stack()
    before = _params(model)
    good = {"embed.weight": torch.zeros(8, 4, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="does not have"):
        torch_masks.apply_masks(model, {**good, "nope.weight": torch.ones(1, dtype=bool)}, True)
    with pytest.raises(ConfigError, match="shape"):
        torch_masks.apply_masks(model, {**good, "head.weight": np.ones((8, 2), bool)}, True)
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
    out = torch_masks.apply_masks(model, {k: np.asarray(v) for k, v in good.items()}, True)
    assert out is model and (model.embed.weight == 0).all()


def test_onnx_writer_copies_unless_inplace_and_checks_names():
    model = _onnx_model()
    keep = np.zeros((16, 8), bool)
    out = onnx_masks.apply_masks(model, {"W1": keep})
    assert out is not model
    assert (numpy_helper.to_array(out.graph.initializer[0]) == 0).all()
    assert (numpy_helper.to_array(model.graph.initializer[0]) != 0).all()
    with pytest.raises(ConfigError, match="does not have"):
        onnx_masks.apply_masks(model, {"W1": keep, "W9": keep})
    assert onnx_masks.apply_masks(model, {"W1": keep}, inplace=True) is model
    assert onnx_masks.weight_uses(model) == [("W1", "mm", "MatMul", 0), ("W2", "gemm", "Gemm", 1)]


SPARSITY_PASSES = Path(__file__).resolve().parents[2] / "passes" / "sparsity"


@pytest.mark.parametrize("path", sorted(SPARSITY_PASSES.glob("*.py")), ids=lambda p: p.name)
def test_sparsity_passes_import_only_the_ir_and_passes(path):
    """Model types, capture and write-back belong to the frontends; the API dispatches."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
    ours = [m for m in imported if m.split(".")[0] == "graphprune"]
    bad = [m for m in ours if not m.startswith(("graphprune.ir", "graphprune.passes"))]
    assert not bad, f"{path.name} imports {bad}"
    assert "onnx" not in {m.split(".")[0] for m in imported}
    assert "ModelProto" not in path.read_text()


@pytest.mark.parametrize("name", [
    "graphprune.api.sparsify", "graphprune.frontends.torch.masks",
    "graphprune.frontends.onnx.masks", "graphprune.passes.sparsity.config",
    "graphprune.passes.sparsity.sparsify", "graphprune.passes.sparsity.weight_arrays",
    "graphprune.passes.sparsity.gradual",
])
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
