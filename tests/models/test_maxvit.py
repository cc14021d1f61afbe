"""MaxViT-pattern block and grid attention (``graphprune.models.maxvit``): the partitions are
exact inverses, their token axes are never groups, and the model prunes from torch and from
ONNX with the window geometry kept (group counts and the oracle on every group:
``tests/test_oracle_zoo.py``)."""

from __future__ import annotations

import onnx
import pytest
import torch
from frontends.onnx_forms import export
from graphprune.models.maxvit import PartitionAttention

import graphprune as gp
from graphprune import models
from graphprune.testing.oracle import run_oracle


@pytest.mark.parametrize("grid", [False, True])
def test_partition_round_trip(grid):
    att = PartitionAttention(8, 2, 4, grid=grid)
    x = torch.arange(2 * 16 * 16 * 8, dtype=torch.float32).view(2, 16, 16, 8)
    parts = att.partition(x)
    assert parts.shape == (2 * 16, 16, 8)  # batch x 4 x 4 groups, 4 x 4 tokens each
    assert torch.equal(att.unpartition(parts, 2, 16, 16), x)
    # block: a window's tokens are neighbours; grid: they are 16 / 4 = 4 apart
    step = 4 if grid else 1
    assert torch.equal(parts[0, 1], x[0, 0, step])


def _token_axes_frozen(pg):
    """No prunable group holds a token axis (1 or 2) of an attention bias."""
    for g in gp.groups(pg):
        if g.prunable:
            assert not {m.axis for m in g.params if "rel_bias" in m.param} - {0}, g.describe()


def test_torch_prunes_with_window_geometry_kept():
    model, inputs = models.get("maxvit_tiny")
    pg = gp.capture(model, inputs)
    _token_axes_frozen(pg)
    res = gp.prune(model, inputs, ratio=0.5)
    out = res.model(*inputs)
    assert out.shape == (2, 10) and res.report.params_after < 0.6 * res.report.params_before
    shapes = {tuple(p.shape) for n, p in res.model.named_parameters() if "rel_bias" in n}
    assert shapes and all(s[1:] == (16, 16) for s in shapes)  # 4 x 4 tokens per group kept


@pytest.mark.parametrize("form", ["legacy", pytest.param("dynamo", marks=pytest.mark.heavy)])
def test_onnx_export_prunes_with_window_geometry_kept(form, tmp_path):
    model, inputs = models.get("maxvit_tiny")
    path = export(model, inputs, tmp_path / "m.onnx", form)
    pg = gp.capture(path)
    _token_axes_frozen(pg)
    res = gp.prune(path, ratio=0.5)
    onnx.checker.check_model(res.model)
    heads = [g for g in gp.groups(pg) if g.prunable and g.size == 2]
    assert len(heads) == 4  # block and grid attention in each of the 2 blocks
    run_oracle(pg, heads[-1].id).assert_close(atol=2e-5, rtol=1e-4)
