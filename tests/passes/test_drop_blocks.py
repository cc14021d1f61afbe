"""Depth pruning: residual branches found, Block Influence ranks a dead branch first, and
dropping a branch whose output is provably zero leaves the model's outputs unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import export_onnx

import graphprune as gp
from graphprune import models
from graphprune.testing.oracle_onnx import random_inputs, run_onnx
from graphprune.passes.prune.drop_blocks import find_blocks

# model: (block count, a parameter of the branch's last op → zeroing it zeroes the branch)
CASES = {
    "llama_tiny": (4, ["layers.1.mlp.down_proj.weight"]),
    "vit_tiny": (4, ["blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"]),
    "hf_llama_tiny": (4, ["model.model.layers.0.self_attn.o_proj.weight"]),
    "mobilenetv2_tiny": (2, ["features.5.conv.7.weight", "features.5.conv.7.bias"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_influence_drops_the_dead_branch_exactly(name):
    n_blocks, zero = CASES[name]
    model, x = models.get(name)
    dead = copy.deepcopy(model)
    with torch.no_grad():
        for p in zero:
            dead.get_parameter(p).zero_()
    res = gp.prune(dead, x, drop_blocks=1, criterion="block_influence", calib=[x, x])
    assert len(res.blocks) == n_blocks
    (dropped,) = res.dropped
    assert any(p.startswith(dropped.name.split("{")[0]) for p in zero)
    assert res.block_scores[dropped.id] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        want, got = dead(*x), res.model(*x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    n_before = sum(p.numel() for p in dead.parameters())
    n_after = sum(p.numel() for p in res.model.parameters())
    assert n_after == res.report.params_after < n_before


def test_dropping_consecutive_blocks_removes_both():
    model, x = models.get("llama_tiny")
    pg = gp.capture(model, x)
    names = [b.name for b in find_blocks(pg)]
    res = gp.prune(model, x, drop_blocks=2, criterion={n: i for i, n in enumerate(names)})
    left = {n for n, _ in res.model.named_parameters()}
    assert not any(n.startswith("layers.0.") for n in left)  # both branches of layer 0 are gone
    assert sum(p.numel() for p in res.model.parameters()) == res.report.params_after


def test_user_scores_choose_the_blocks():
    model, x = models.get("vit_tiny")
    names = [b.name for b in find_blocks(gp.capture(model, x))]
    scores = {n: float(i) for i, n in enumerate(names)}  # lowest first: drop the first two
    res = gp.prune(model, x, drop_blocks=2, criterion=scores)
    assert [b.name for b in res.dropped] == names[:2]
    assert res.model(*x).shape == model(*x).shape
    with pytest.raises(gp.ConfigError, match="unknown blocks"):
        gp.prune(model, x, drop_blocks=1, criterion={"nope": 1.0})
    with pytest.raises(gp.ConfigError, match="needs calib"):
        gp.prune(model, x, drop_blocks=1, criterion="block_influence")
    with pytest.raises(gp.ConfigError, match="has 4 residual blocks"):
        gp.prune(model, x, drop_blocks=9, criterion=scores)


def test_projection_shortcuts_are_not_blocks():
    model, x = models.get("resnet_tiny")
    blocks = find_blocks(gp.capture(model, x))
    assert [b.name for b in blocks] == ["stages.0.0.body"]  # the others downsample the skip


def test_depth_pruning_on_onnx():
    model, x = models.get("vit_tiny_sdpa")
    onnx_model = export_onnx(model, x)
    pg = gp.capture(onnx_model)
    blocks = find_blocks(pg)
    assert len(blocks) == 4
    res = gp.prune(onnx_model, drop_blocks=2, criterion={b.name: i for i, b in enumerate(blocks)})
    feeds = random_inputs(pg)
    out = run_onnx(res.model, feeds)
    assert [o.shape for o in out] == [o.shape for o in run_onnx(onnx_model, feeds)]
    assert len(res.model.graph.node) < len(onnx_model.graph.node)
    assert np.isfinite(out[0]).all()


def test_layer_unit_drops_whole_transformer_layers_exactly():
    """depth_unit='layer' pairs each layer's attention and MLP branches; a layer whose both
    branches output zero scores BI 0, goes first, and dropping it changes nothing."""
    model, x = models.get("hf_llama_tiny")
    dead = copy.deepcopy(model)
    with torch.no_grad():
        for p in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            dead.get_parameter(f"model.model.layers.1.{p}").zero_()
    pg = gp.capture(dead, x)
    assert len(find_blocks(pg)) == 4
    res = gp.prune(dead, x, drop_blocks=1, criterion="block_influence", calib=[x, x], graph=pg,
                   depth_unit="layer")
    assert [b.name for b in res.blocks] == ["model.model.layers.0", "model.model.layers.1"]
    (dropped,) = res.dropped
    assert dropped.name == "model.model.layers.1" and len(dropped.branches) == 2
    assert res.block_scores[dropped.id] == pytest.approx(0.0, abs=1e-6)
    assert res.block_scores[0] > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(res.model(*x), dead(*x), atol=1e-5, rtol=1e-5)
    left = {n for n, _ in res.model.named_parameters()}
    assert not any(".layers.1." in n for n in left) and any(".layers.0." in n for n in left)
    assert sum(p.numel() for p in res.model.parameters()) == res.report.params_after
    with pytest.raises(gp.ConfigError, match="depth_unit"):
        gp.prune(dead, x, drop_blocks=1, criterion="block_influence", calib=[x], graph=pg,
                 depth_unit="stage")
