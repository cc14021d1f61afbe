"""Depth pruning of a ``transformers`` decoder drops whole layers: the same class, fewer layers,
``num_hidden_layers`` and the KV-cache layer indices updated, so it generates with a cache and
reloads with plain ``from_pretrained``. Reference: the original with the dropped layer's two
residual branches silenced (their output projections zeroed), i.e. an identity layer."""

from __future__ import annotations

import copy

import pytest
import torch
from graphprune.models.hf import pretrained_tiny
from hf_helpers import PLAIN, run_script, token_batch

import graphprune as gp

safetensors = pytest.importorskip("safetensors.torch")


def _silenced(model, index):
    ref = copy.deepcopy(model)
    layer = ref.model.layers[index]
    with torch.no_grad():
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_drop_layer_keeps_class_and_generates(family, tmp_path):
    model, x = pretrained_tiny(family)
    res = gp.prune(model, x, drop_blocks=1, depth_unit="layer", criterion="block_influence",
                   calib=[x])  # fmt: skip
    assert res.report.form == "module" and type(res.model) is type(model)
    assert res.model.config.num_hidden_layers == 1 and len(res.model.model.layers) == 1
    assert res.model.model.layers[0].self_attn.layer_idx == 0
    gone = int(res.dropped[0].name.rsplit(".", 1)[1])
    ref = _silenced(model, gone)
    for batch, seq, masked in ((1, 5, False), (3, 21, True)):
        kw = token_batch(batch, seq, masked)
        with torch.no_grad():
            torch.testing.assert_close(res.model(**kw).logits, ref(**kw).logits,
                                       atol=1e-5, rtol=1e-4)  # fmt: skip
    prompt = token_batch(2, 6, masked=True, seed=4)
    gen = {"max_new_tokens": 8, "do_sample": False, "use_cache": True, "pad_token_id": 0,
           "output_scores": True, "return_dict_in_generate": True}  # fmt: skip
    with torch.no_grad():
        want, got = ref.generate(**prompt, **gen), res.model.generate(**prompt, **gen)
    for step in want.scores:
        top2 = step.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "tied logits make greedy ambiguous"
    assert torch.equal(got.sequences, want.sequences)
    d = str(tmp_path / family)
    res.model.save_pretrained(d)
    kw = token_batch(2, 9, masked=True)
    safetensors.save_file(kw, d + "/inputs.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run_script(PLAIN, d)["0"], res.model(**kw).logits,
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_partial_layers_stay_a_graph_module():
    model, x = pretrained_tiny("bert")  # post-LN: a "layer" block is not one whole BertLayer
    res = gp.prune(model, x, drop_blocks=1, depth_unit="layer", criterion="block_influence",
                   calib=[x])  # fmt: skip
    assert res.report.form == "graph_module"
    assert any("not whole layers" in n for n in res.report.notes)
