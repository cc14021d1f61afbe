"""gp.prune_checkpoint: a checkpoint pruned layer by layer from disk equals gp.prune(uniform=True)
in memory (same removed indices, same weights, same outputs) and reloads with plain transformers.

Tiny Llama with GQA from a random config (hidden 64, 8 heads over 4 kv heads, 3 layers), saved
in small shards so one layer spans several files; each case runs in a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from graphprune.passes.coupling import build_coupling

import graphprune as gp
from graphprune.ir.errors import ArtifactError, ConfigError

transformers = pytest.importorskip("transformers")


def _llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    _llama().save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 3
    return path


def _ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def _in_memory(model, **kw):
    # The residual width is kept by prune_checkpoint; gp.prune cuts it unless told not to.
    return gp.prune(model, (_ids(),), uniform=True, ignore=["model.embed_tokens"], **kw)


def _removed(res) -> dict:
    groups = build_coupling(res.graph).groups
    return {tuple(sorted({(m.param, m.axis) for m in groups[gid].params})): [int(i) for i in idx]
            for gid, idx in res.selection.removal.items()}


@pytest.mark.parametrize("criterion,scope,ratio", [("l2", "local", 0.5), ("l1", "global", 0.5)])
def test_streamed_prune_equals_in_memory(saved, tmp_path, criterion, scope, ratio):
    res = gp.prune_checkpoint(saved, tmp_path / "out", ratio=ratio, criterion=criterion,
                              scope=scope)
    ref = _in_memory(transformers.LlamaForCausalLM.from_pretrained(saved).eval(), ratio=ratio,
                     criterion=criterion, scope=scope)
    assert {k: list(map(int, v)) for k, v in res.removed.items()} == _removed(ref)
    assert len(res.removed) == 6  # kv-head groups and MLP channels of each of 3 layers
    out = transformers.AutoModelForCausalLM.from_pretrained(res.path).eval()
    theirs = ref.model.state_dict()
    mine = out.state_dict()
    assert sorted(mine) == sorted(theirs)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k
    with torch.no_grad():
        torch.testing.assert_close(out(_ids()).logits, ref.model(_ids()).logits, atol=1e-5,
                                   rtol=0)
    cfg = json.loads((res.path / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert (cfg["hidden_size"], cfg["head_dim"]) == (64, 8)
    assert heads < 8 and heads == 2 * kv and cfg["intermediate_size"] < 96
    assert res.report.sizes["num_attention_heads"] == (8, heads)
    assert res.report.params_after == sum(p.numel() for p in out.parameters())
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # one shard per layer, one for the rest


def test_heads_false_cuts_only_the_mlp(saved, tmp_path):
    res = gp.prune_checkpoint(saved, tmp_path / "out", ratio=0.5, heads=False)
    cfg = json.loads((res.path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4)
    assert cfg["intermediate_size"] == 48
    assert all("mlp" in k[0][0] for k in res.removed)


def test_bf16_checkpoint_stays_bf16(tmp_path):
    _llama(torch.bfloat16).save_pretrained(tmp_path / "src")
    res = gp.prune_checkpoint(tmp_path / "src", tmp_path / "out", ratio=0.5)
    out = transformers.AutoModelForCausalLM.from_pretrained(res.path, dtype="auto").eval()
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    ref = _in_memory(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src",
                                                                   dtype="auto").eval(),
                     ratio=0.5)
    for k, v in out.state_dict().items():
        assert torch.equal(v, ref.model.state_dict()[k]), k


def test_head_count_the_config_refuses_is_not_cut(saved, tmp_path):
    # 1 of 4 kv groups would leave 6 heads; LlamaConfig requires hidden_size % heads == 0, so
    # from_pretrained would refuse that config: the heads stay, the MLP is still cut.
    res = gp.prune_checkpoint(saved, tmp_path / "out", ratio=0.25)
    assert any("refuses to load 6 attention heads" in n for n in res.report.notes)
    out = transformers.AutoModelForCausalLM.from_pretrained(res.path)
    assert (out.config.num_attention_heads, out.config.intermediate_size) == (8, 72)
    assert all("mlp" in k[0][0] for k in res.removed)


def test_activation_criteria_are_refused(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"criterion='wanda'.*gp.prune\(\.\.\., calib"):
        gp.prune_checkpoint(saved, tmp_path / "out", criterion="wanda")
    assert not (tmp_path / "out").exists()


def test_existing_dst_is_refused(saved, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="exists"):
        gp.prune_checkpoint(saved, tmp_path / "out")


def test_corrupt_layer_leaves_no_partial_output(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    bad = index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (broken / bad).write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match=bad):
        gp.prune_checkpoint(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no staging folder left
