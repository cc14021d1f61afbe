"""The dead-channel oracle on every prunable group of every model in the zoo, both frontends.

For each group: zero every parameter slice the group touches (the channels are provably dead),
remove the group physically, and compare with the original. Approximate groups (statistics such
as LayerNorm/RMSNorm run over them) are compared with a reference whose reductions are masked to
the kept channels. The ONNX path runs through onnxruntime and ``onnx.checker``.

How many groups are prunable follows from each model's structure (``TORCH_GROUPS``, derived in
its comment), and the ONNX capture finds the same exact index spaces as torch (same sizes and
granularities), but for the differences ``ONNX_DIFFERS`` lists with their reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import export_onnx

import graphprune as gp
from graphprune import models
from graphprune.passes.coupling import build_coupling
from graphprune.testing.oracle import choose_indices, run_oracle

# Prunable groups via torch.export. A "width" is the output channels of a conv/Linear that only
# its own consumers read; the output layer's classes and the input's channels are always frozen.
# Transformers here have 2 layers; "hidden" is the residual stream, approximate (not exact) where
# LayerNorm/RMSNorm statistics run over it, frozen where it is the model's output.
TORCH_GROUPS = {
    # 4 stages x 1 BasicBlock: each block's inner width (4), each stage's residual stream (4;
    # stage 0 has an identity shortcut, so the stem is in its stream)
    "resnet_tiny": 4 + 4,
    # 4 Bottlenecks x 2 inner widths (1x1 reduce, 3x3) = 8; residual streams: the stem alone
    # (stage 0 starts with a 1x1 downsample, 4 -> 16) + one per stage (3)
    "resnet_bottleneck_tiny": 4 * 2 + 1 + 3,
    # five conv widths (16, 32, 32, 64, 64; the last flattens into the classifier) + the hidden
    # Linear (64)
    "vgg_tiny": 5 + 1,
    # 6 blocks: the t=1 block's depthwise conv shares the stem's width (1); the 5 expanding blocks'
    # hidden widths (expand = depthwise) (5); one stream per stage (8, 16, 24, 32: a stride-1
    # block of equal width adds into it) (4); the last 1x1 conv (1)
    "mobilenetv2_tiny": 1 + 5 + 4 + 1,
    # the stem (1); each unit's branch width (4 units); the last grouped 1x1 conv (1); the stage
    # outputs split into binary digits by the channel shuffle (pairs), the next unit's chunk and
    # the grouped 1x1 convs: the digits none of them fixes are groups of 2 (stage 1 of 16
    # channels: 2, stage 2 of 32: 3)
    "shufflenet_tiny": 1 + 4 + 1 + 2 + 3,
    # the stem (1); 2 blocks x 3 dense layers x (1x1 bottleneck width 32, growth 8) (12); the
    # transition conv (1). Each growth width reaches every later layer through the cats.
    "densenet_tiny": 1 + 2 * 3 * 2 + 1,
    # encoder and bottom: 3 double convs (6); up2 (ConvTranspose) and up1 widths (2); each of the
    # 4 decoder convs (GroupNorm, 4 groups) gives whole GroupNorm groups (exact) and the same
    # position in every group (approximate: the group statistics change) (8)
    "unet_tiny": 6 + 2 + 4 * 2,
    # two conv widths + the hidden Linear
    "digits_cnn": 2 + 1,
    # fused qkv: per layer whole heads, head_dim (one index for q, k and v: the fused output is
    # reshaped to (3, heads, head_dim)), the MLP width (2 x 3); hidden (approximate, 1)
    "vit_tiny": 2 * 3 + 1,
    # separate q, k, v: per layer heads, q/k head_dim, v head_dim, MLP (2 x 4); hidden (1)
    "vit_tiny_sdpa": 2 * 4 + 1,
    # per block the head_dim and the MLP width (2 x 2); whole heads are frozen (the relative-
    # position bias is gathered with aten.index, which has no coupling rule) and so is the hidden
    # stream (aten.roll of the shifted windows has none either)
    "swin_tiny": 2 * 2,
    # GQA: per layer kv-head groups (a kv head with its query heads), v head_dim, MLP (2 x 3); the
    # q/k rotary frequencies, one index across both layers (one inv_freq buffer) (1); hidden (1)
    "llama_tiny": 2 * 3 + 1 + 1,
    "llama_tiny_tied": 2 * 3 + 1 + 1,  # the same; the tied embedding/head is in hidden
    # per layer heads, q/k head_dim, v head_dim, MLP (2 x 4); hidden is the output (frozen)
    "hf_bert_tiny": 2 * 4,
    # Conv1D c_attn fused like vit_tiny: per layer heads, head_dim, MLP (2 x 3); hidden (1)
    "hf_gpt2_tiny": 2 * 3 + 1,
    "hf_llama_tiny": 2 * 3 + 1 + 1,  # as llama_tiny
    "hf_vit_tiny": 2 * 4,  # as hf_bert_tiny
    # per block: the MBConv expansion (1); block and grid attention each give whole heads (with
    # the learned bias's head axis), head_dim (fused qkv: one index for q, k and v) and the MLP
    # width (2 x 3): 2 blocks x 7; the stream (LayerNorm statistics: approximate) (1). The
    # bias's token axes (window and grid positions) are frozen.
    "maxvit_tiny": 2 * 7 + 1,
}

# Of those, the approximate ones (statistics run over them): the hidden streams under
# LayerNorm/RMSNorm, and unet's same-position-in-every-GroupNorm-group groups.
APPROXIMATE = {"unet_tiny": 4, "vit_tiny": 1, "vit_tiny_sdpa": 1, "llama_tiny": 1,
               "llama_tiny_tied": 1, "hf_gpt2_tiny": 1, "hf_llama_tiny": 1,
               "maxvit_tiny": 1}  # fmt: skip

# Exact prunable groups as (size, granularity) that one frontend finds and the other does not.
# name: (torch only, ONNX only)
ONNX_DIFFERS = {
    # ONNX folds the rotary cos/sin tables into constants, which each layer's use can slice
    # alone: the q/k rotary frequencies are one index per layer instead of one across both
    "llama_tiny": ({}, {(4, 8): 1}),
    "llama_tiny_tied": ({}, {(4, 8): 1}),
    "hf_llama_tiny": ({(8, 4): 1}, {(8, 8): 2}),
    # the exported index is a Gather of a constant, which has a rule: whole heads (2 per block)
    # are prunable on ONNX (the hidden stream is too, but approximate: LayerNorm)
    "swin_tiny": ({}, {(2, 48): 2}),
    # the same heads (4 attentions x 2): granularity is read from a group's first parameter,
    # the bias (1 position per head) in torch's order, the fused qkv weight (3 x 16 rows per
    # head) in the export's
    "maxvit_tiny": ({(2, 1): 4}, {(2, 48): 4}),
}


def _exact_spaces(pg) -> Counter:
    return Counter((g.size, g.granularity) for g in build_coupling(pg).groups
                   if g.prunable and g.exact)  # fmt: skip


def test_expected_covers_the_zoo():
    assert set(TORCH_GROUPS) == set(models.ZOO)
    assert set(ONNX_DIFFERS) | set(APPROXIMATE) <= set(models.ZOO)


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_bottleneck_tiny"])
def test_a_residual_stage_is_one_group(name):
    """A stage's blocks add into one stream: the output channels of every block's last conv and
    of the stage's downsample are one group, and nothing else splits them."""
    model, inputs = models.get(name)
    cp = build_coupling(gp.capture(model, inputs))
    for i, stage in enumerate(model.stages):
        outputs = {f"stages.{i}.{j}.body.{len(block.body) - 2}.weight"  # conv, then its BN
                   for j, block in enumerate(stage)}  # fmt: skip
        outputs |= {f"stages.{i}.{j}.downsample.0.weight" for j, block in enumerate(stage)
                    if block.downsample is not None}  # fmt: skip
        holding = {g.id for g in cp.groups for m in g.params
                   if m.param in outputs and m.axis == 0}  # fmt: skip
        assert len(holding) == 1, (i, holding)
        (gid,) = holding
        assert cp.groups[gid].prunable and cp.groups[gid].size == stage[0].body[-1].num_features
        assert outputs <= {m.param for m in cp.groups[gid].params if m.axis == 0}


@pytest.mark.parametrize("name", sorted(TORCH_GROUPS))
def test_torch_oracle_on_every_group(name):
    model, inputs = models.get(name)
    pg = gp.capture(model, inputs)
    groups = [g for g in build_coupling(pg).groups if g.prunable]
    assert len(groups) == TORCH_GROUPS[name], gp.explain(pg)
    assert sum(not g.exact for g in groups) == APPROXIMATE.get(name, 0), gp.explain(pg)
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(TORCH_GROUPS))
def test_onnx_oracle_on_every_exact_group(name):
    model, inputs = models.get(name)
    pg = gp.capture(export_onnx(model, inputs))
    groups = [g for g in build_coupling(pg).groups if g.prunable and g.exact]
    torch_only, onnx_only = (Counter(d) for d in ONNX_DIFFERS.get(name, ({}, {})))
    want = _exact_spaces(gp.capture(model, inputs)) - torch_only + onnx_only
    assert _exact_spaces(pg) == want, gp.explain(pg)
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenetv2_tiny", "shufflenet_tiny",
                                  "densenet_tiny", "unet_tiny", "vit_tiny", "hf_llama_tiny"])
def test_torch_oracle_with_every_group_pruned_at_once(name):
    model, inputs = models.get(name)
    pg = gp.capture(model, inputs)
    rng = np.random.default_rng(0)
    removal = {g.id: choose_indices(g.size, rng, 0.4) for g in build_coupling(pg).groups
               if g.prunable}  # fmt: skip
    run_oracle(pg, removal).assert_close(atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet_tiny", "densenet_tiny", "hf_bert_tiny"])
def test_onnx_oracle_with_every_exact_group_pruned_at_once(name):
    model, inputs = models.get(name)
    pg = gp.capture(export_onnx(model, inputs))
    rng = np.random.default_rng(0)
    removal = {g.id: choose_indices(g.size, rng, 0.4) for g in build_coupling(pg).groups
               if g.prunable and g.exact}  # fmt: skip
    run_oracle(pg, removal).assert_close(atol=5e-5, rtol=1e-4)
