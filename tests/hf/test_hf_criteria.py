"""Data-driven criteria on ``transformers`` models without a hand-written loss, and ``uniform=``
(the same cut in every layer, chosen by importance summed across layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphprune.models.hf import pretrained_tiny
from graphprune.passes.coupling import build_coupling
from graphprune.passes.prune.calibration import default_loss
from hf_helpers import pruned, token_batch

import graphprune as gp
from graphprune.ir.errors import ConfigError

transformers = pytest.importorskip("transformers")


def test_default_loss_prefers_the_models_own_loss():
    from transformers.modeling_outputs import CausalLMOutput

    logits = torch.randn(2, 3, 5)
    own = torch.tensor(7.0)
    assert default_loss(CausalLMOutput(loss=own, logits=logits)) is own
    torch.testing.assert_close(default_loss(CausalLMOutput(logits=logits)),
                               0.5 * logits.pow(2).mean())  # fmt: skip


def test_default_loss_names_what_to_pass():
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(logits=torch.randn(2, 3, 5))
    with pytest.raises(ConfigError, match="labels in example_inputs"):
        default_loss(out, (torch.zeros(2, 3), torch.zeros(2, 3)), 1)  # labels the model never saw
    with pytest.raises(ConfigError, match="loss_fn"):
        default_loss({"ids": torch.zeros(2, 3, dtype=torch.int64)})


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradient_criteria_without_a_loss_fn(family, criterion):
    model, x = pretrained_tiny(family)
    calib = [x, (torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5)),)]
    res = gp.prune(model, x, ratio=0.25, criterion=criterion, calib=calib)
    assert res.report.form == "module" and res.selection.removal
    s = next(iter(res.selection.scores.values()))
    assert np.isfinite(s).all() and s.max() > 0


def test_taylor_with_labels_uses_the_models_loss():
    model, (ids,) = pretrained_tiny("llama")
    batch = {"input_ids": ids, "labels": ids}
    res = gp.prune(model, batch, ratio=0.25, criterion="taylor", calib=[batch])
    assert res.report.form == "module" and res.selection.removal
    with pytest.raises(ConfigError, match="do not match the captured inputs"):
        gp.prune(model, batch, ratio=0.25, criterion="taylor", calib=[{"input_ids": ids}])


def _mlp_cuts(res) -> list[int]:
    groups = build_coupling(res.graph).groups
    return [len(res.selection.removal.get(g.id, [])) for g in groups
            if any(m.param.endswith("mlp.up_proj.weight") and m.axis == 0 for m in g.params)]


def test_uniform_cuts_every_layer_alike_under_global_scope():
    model, x = pretrained_tiny("llama")
    with torch.no_grad():  # layer 0's MLP matters far more: a global ranking cuts layer 1 harder
        for lin in (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj):
            lin.weight.mul_(10)
    skew = gp.prune(model, x, ratio=0.3, scope="global", uniform=False, ignore=["*self_attn*"])
    flat = gp.prune(model, x, ratio=0.3, scope="global", ignore=["*self_attn*"])
    a, b = _mlp_cuts(skew), _mlp_cuts(flat)
    assert len(a) == len(b) == 2
    assert a[0] != a[1], "the skewed model should make a non-uniform global cut differ"
    assert b[0] == b[1] > 0
    assert flat.report.form == "module"
    assert flat.model.config.intermediate_size == 128 - b[0]


def test_uniform_keeps_query_heads_a_multiple_of_kv_heads():
    _, _, res = pruned("qwen2", ratio=0.5)
    cfg = res.model.config
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2
    for layer in res.model.model.layers:
        assert layer.self_attn.q_proj.out_features == 2 * layer.self_attn.head_dim


def test_pruned_model_accepts_labels_and_attention_outputs():
    _, _, res = pruned("llama")
    kw = token_batch(2, 10, masked=True)
    out = res.model(**kw, labels=kw["input_ids"], output_hidden_states=True)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape[-1] == 32
