"""A pruned ``transformers`` model stays an instance of its class, with smaller layers and updated
attributes and config, and computes what the original computes with the removed channels dead,
at shapes other than the captured one, with and without attention masks, and in ``generate()``.
"""

from __future__ import annotations

import pytest
import torch
from hf_helpers import EMBEDDINGS, dead_copy, main_output, pruned, token_batch

pytest.importorskip("transformers")

FAMILIES = ["llama", "qwen2", "gpt2", "bert", "vit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_config_prune_keeps_class_and_config(family):
    model, _, res = pruned(family)
    assert res.report.form == "module"
    assert type(res.model) is type(model)
    assert res.report.params_after < res.report.params_before
    cfg, new = model.config, res.model.config
    mlp = "n_inner" if family == "gpt2" else "intermediate_size"
    before = getattr(cfg, mlp) or 4 * cfg.hidden_size
    assert getattr(new, mlp) < before
    assert any("reloads with transformers' own from_pretrained" in n for n in res.report.notes)
    assert model.config.hidden_size == 64  # the user's model is untouched


def test_llama_gqa_attributes_follow_the_weights():
    _, _, res = pruned("llama")
    cfg = res.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    for layer in res.model.model.layers:
        a = layer.self_attn
        assert a.q_proj.out_features == cfg.num_attention_heads * a.head_dim
        assert a.k_proj.out_features == cfg.num_key_value_heads * a.head_dim
        assert a.num_key_value_groups == 2
        assert layer.mlp.intermediate_size == cfg.intermediate_size == 64
    assert cfg.hidden_size == res.model.model.embed_tokens.weight.shape[1] == 32


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_head_size_rule_leaves_heads_and_width_alone(family):
    _, _, res = pruned(family)
    notes = "\n".join(res.report.notes)
    assert "left heads unpruned" in notes and "hidden_size ÷ num_attention_heads" in notes
    assert res.model.config.num_attention_heads == 4
    assert res.model.config.hidden_size == 64


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("masked", [False, True])
def test_dead_channel_oracle_at_other_shapes(family, masked):
    model, _, res = pruned(family, ignore=[EMBEDDINGS[family]] if family in EMBEDDINGS else None)
    assert res.report.form == "module" and res.selection.removal
    ref = dead_copy(model, res)
    for batch, seq in ((1, 5), (3, 16), (4, 40)):
        kw = token_batch(batch, seq, masked)
        with torch.no_grad():
            want, got = main_output(ref(**kw)), main_output(res.model(**kw))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_dead_channel_oracle_vit_other_batches():
    model, _, res = pruned("vit", ignore=[EMBEDDINGS["vit"]])
    ref = dead_copy(model, res)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(res.model(x).last_hidden_state,
                                       ref(x).last_hidden_state, atol=1e-5, rtol=1e-4)


def _kill_mlp_channels(model, channels):
    """Make MLP channels provably dead in every layer: zero their rows and columns."""
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight[channels] = 0
            mlp.down_proj.weight[:, channels] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_equal_after_pruning_dead_channels(family):
    from graphprune.models.hf import pretrained_tiny

    import graphprune as gp

    model, x = pretrained_tiny(family)
    dead = list(range(0, 128, 4))  # 32 of 128 channels per layer
    _kill_mlp_channels(model, dead)
    res = gp.prune(model, x, ratio=0.25, ignore=[EMBEDDINGS[family], "*self_attn*"])
    assert res.report.form == "module"
    removed = [sorted(idx) for idx in res.selection.removal.values()]
    assert removed == [dead, dead], "only the dead channels should go"
    assert res.model.config.intermediate_size == 96
    prompt = token_batch(2, 7, masked=True, seed=3)
    kw = {"max_new_tokens": 12, "do_sample": False, "use_cache": True, "pad_token_id": 0,
          "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        want = model.generate(**prompt, **kw)
        got = res.model.generate(**prompt, **kw)
    for step in want.scores:  # greedy is only defined where the top two logits are not tied
        top2 = step.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "tied logits make greedy ambiguous"
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores),
                               atol=1e-5, rtol=1e-4)
