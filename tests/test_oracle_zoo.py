"""The dead-channel oracle on every prunable group of every model in the zoo, both frontends.

For each group: zero every parameter slice the group touches (the channels are provably dead),
remove the group physically, and compare with the original. Approximate groups (statistics such
as LayerNorm/RMSNorm run over them) are compared with a reference whose reductions are masked to
the kept channels. The ONNX path runs through onnxruntime and ``onnx.checker``.

The prunable-group counts are golden: a change in the analysis that freezes (or frees) groups
shows up here.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import export_onnx

import graphprune as gp
from graphprune import models
from graphprune.testing.oracle import choose_indices, run_oracle
from graphprune.passes.coupling import build_coupling

# name: (prunable groups via torch.export, prunable exact groups via ONNX)
EXPECTED = {
    "resnet_tiny": (8, 8),
    "resnet_bottleneck_tiny": (12, 12),
    "vgg_tiny": (6, 6),
    "mobilenetv2_tiny": (11, 11),
    "shufflenet_tiny": (11, 11),
    "densenet_tiny": (14, 14),
    "unet_tiny": (16, 12),
    "digits_cnn": (3, 3),
    "vit_tiny": (7, 6),
    "vit_tiny_sdpa": (9, 8),
    "swin_tiny": (4, 6),
    "llama_tiny": (8, 8),
    "llama_tiny_tied": (8, 8),
    "hf_bert_tiny": (8, 8),
    "hf_gpt2_tiny": (7, 6),
    "hf_llama_tiny": (8, 8),
    "hf_vit_tiny": (8, 8),
}


def test_expected_covers_the_zoo():
    assert set(EXPECTED) == set(models.ZOO)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torch_oracle_on_every_group(name):
    model, inputs = models.get(name)
    pg = gp.capture(model, inputs)
    groups = [g for g in build_coupling(pg).groups if g.prunable]
    assert len(groups) == EXPECTED[name][0], gp.explain(pg)
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_onnx_oracle_on_every_exact_group(name):
    model, inputs = models.get(name)
    pg = gp.capture(export_onnx(model, inputs))
    groups = [g for g in build_coupling(pg).groups if g.prunable and g.exact]
    assert len(groups) == EXPECTED[name][1], gp.explain(pg)
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenetv2_tiny", "shufflenet_tiny",
                                  "densenet_tiny", "unet_tiny", "vit_tiny", "hf_llama_tiny"])
def test_torch_oracle_with_every_group_pruned_at_once(name):
    model, inputs = models.get(name)
    pg = gp.capture(model, inputs)
    rng = np.random.default_rng(0)
    removal = {g.id: choose_indices(g.size, rng, 0.4) for g in build_coupling(pg).groups if g.prunable}
    run_oracle(pg, removal).assert_close(atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet_tiny", "densenet_tiny", "hf_bert_tiny"])
def test_onnx_oracle_with_every_exact_group_pruned_at_once(name):
    model, inputs = models.get(name)
    pg = gp.capture(export_onnx(model, inputs))
    rng = np.random.default_rng(0)
    removal = {g.id: choose_indices(g.size, rng, 0.4) for g in build_coupling(pg).groups
               if g.prunable and g.exact}  # fmt: skip
    run_oracle(pg, removal).assert_close(atol=5e-5, rtol=1e-4)
