"""Capture: one IR from torch.export and ONNX, plain to inspect, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from helpers import export_onnx

import graphprune as gp
from graphprune.passes.coupling import build_coupling


def mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), (torch.randn(2, 4),)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = nn.functional.max_pool2d(y, 4)
        return self.fc(torch.flatten(y, 1))


def test_golden_listing_of_an_mlp():
    # x ─ linear(0) ─ relu ─ linear(2) ─ out
    pg = gp.capture(*mlp())
    assert pg.capture_method == "torch.export"
    assert pg.to_text() == (
        "%linear = linear(input, 0.weight, 0.bias)  # [2, 8]\n"
        "%relu = activation(%linear)  # [2, 8]\n"
        "%linear_1 = linear(%relu, 2.weight, 2.bias)  # [2, 2]"
    )
    assert pg.value("0.weight").role == "param"
    assert pg.producer("%relu") == "relu"
    assert pg.consumers("%relu") == [("linear_1", 0)]
    assert pg.param("linear", 1) == "0.weight"
    assert pg.value("0.weight").dim_roles == ("out_features", "in_features")
    assert pg.value("0.bias").dim_roles == ("out_features",)
    (edge,) = pg.nx.get_edge_data("%relu", "linear_1").values()
    assert edge == {"slot": 0, "shape": (2, 8), "dtype": "float32"}


def test_conv_parameters_name_their_dimensions():
    torch.manual_seed(0)
    pg = gp.capture(ConvNet().eval(), (torch.randn(2, 3, 8, 8),))
    assert pg.value("conv.weight").dim_roles == ("out_channels", "in_channels_per_group", "kernel",
                                                 "kernel")  # fmt: skip
    assert pg.value("fc.weight").dim_roles == ("out_features", "in_features")


def test_torch_and_onnx_frontends_give_the_same_kinds():
    torch.manual_seed(0)
    model, x = ConvNet().eval(), (torch.randn(2, 3, 8, 8),)
    pt = gp.capture(model, x)
    ox = gp.capture(export_onnx(model, x))
    kinds = lambda pg: sorted(pg.op(o).kind for o in pg.ops())  # noqa: E731
    assert kinds(pt) == kinds(ox) == ["activation", "conv", "linear", "pool", "reshape"]
    # The same groups, found from either side: conv out-channels couple with the fc in-features.
    for pg in (pt, ox):
        (g,) = [g for g in build_coupling(pg).groups if g.prunable]
        assert g.size == 8
        assert {(m.param, m.axis, m.block) for m in g.params} >= {
            ("conv.weight", 0, 1), ("conv.bias", 0, 1), ("fc.weight", 1, 4)}


def test_onnx_file_path_and_json_dump(tmp_path):
    model, x = mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(export_onnx(model, x), path)
    pg = gp.capture(str(path))
    assert pg.frontend == "onnx" and pg.name == "mlp"
    data = json.loads(pg.to_json())
    assert len(data["nodes"]) == pg.nx.number_of_nodes()
    assert len(data["edges"]) == pg.nx.number_of_edges()
    assert data["graph"]["inputs"] == pg.inputs


def test_user_model_is_never_modified():
    model, x = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pg = gp.capture(model, x)
    small = gp.remove_channels(pg, {build_coupling(pg).groups[0].id: [0, 1, 2]})
    assert small(*x).shape == (2, 2)
    assert small.get_submodule("0").weight.shape == (5, 4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].weight.shape == (8, 4)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_control_flow_is_refused_clearly():
    with pytest.raises(gp.CaptureError, match="Data-dependent control flow"):
        gp.capture(DataDependent(), (torch.randn(2, 3),))


def test_wrong_example_input_shape_names_the_shapes():
    model, _ = mlp()
    with pytest.raises(gp.CaptureError, match=r"shapes \[\(2, 5\)\]"):
        gp.capture(model, (torch.randn(2, 5),))


def test_missing_example_inputs():
    with pytest.raises(gp.CaptureError, match="needs example_inputs"):
        gp.capture(mlp()[0])


def test_truncated_onnx_file_names_the_file(tmp_path):
    model, x = mlp()
    data = export_onnx(model, x).SerializeToString()
    path = tmp_path / "broken.onnx"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(gp.CaptureError, match="broken.onnx"):
        gp.capture(path)
    with pytest.raises(gp.CaptureError, match="does not exist"):
        gp.capture(tmp_path / "nope.onnx")


def test_not_a_model():
    with pytest.raises(gp.CaptureError, match="cannot capture an object of type list"):
        gp.capture([1, 2, 3])


def test_removing_a_frozen_group_says_why():
    pg = gp.capture(*mlp())
    frozen = next(g for g in build_coupling(pg).groups if g.frozen_reason)
    with pytest.raises(gp.ConfigError, match="frozen: reaches model"):
        gp.remove_channels(pg, {frozen.id: [0]})
    with pytest.raises(gp.ConfigError, match="keep at least one"):
        gp.remove_channels(pg, {0: list(range(8))})


def test_ratio_zero_is_the_identity():
    model, x = mlp()
    pg = gp.capture(model, x)
    same = gp.remove_channels(pg, {})
    np.testing.assert_array_equal(same(*x).detach().numpy(), model(*x).detach().numpy())
