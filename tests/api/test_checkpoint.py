"""gp.sparsify_checkpoint: a checkpoint streamed layer by layer gives gp.sparsify's masks and
weights.

Tiny Llama from a random config (hidden 64, 2 layers), saved with save_pretrained in small shards
so the tensors of one layer span several files; each case runs in about a second.
"""

from __future__ import annotations

import json

import pytest
import torch

import graphprune as gp
from graphprune.ir.errors import ArtifactError, ConfigError

transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(3)]
    # The last batch is padded: its padded positions must stay out of the statistics.
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 8:] = 0
    return [ids[0], ids[1], {"input_ids": ids[2], "attention_mask": mask}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    _llama().save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 3
    return path


def _in_memory(saved, method):
    model = transformers.LlamaForCausalLM.from_pretrained(saved).eval()
    # The HF default use_cache=True gives different masks from layer 1 on in the in-memory walk
    # (each layer runs twice with one KV cache); the streamed path runs without a cache.
    model.config.use_cache = False
    return gp.sparsify(model, calib=_calib(), method=method, sparsity=0.5, inplace=True)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_masks_and_weights_equal_in_memory(saved, tmp_path, method):
    res = gp.sparsify_checkpoint(saved, tmp_path / "out", _calib(), method=method, sparsity=0.5,
                                 return_masks=True)
    ref = _in_memory(saved, method)
    assert sorted(res.masks) == sorted(ref.masks) and len(res.masks) == 14
    for k, m in ref.masks.items():
        assert torch.equal(res.masks[k], m), k
    out = transformers.LlamaForCausalLM.from_pretrained(res.path).eval()
    theirs = ref.model.state_dict()
    for k, v in out.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert res.report.total_sparsity == pytest.approx(ref.report.total_sparsity)
    assert "lm_head" not in " ".join(res.masks)
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per layer, one for the rest
    assert (res.path / "config.json").is_file()


def test_offloaded_activations_give_the_same_checkpoint(saved, tmp_path):
    a = gp.sparsify_checkpoint(saved, tmp_path / "a", _calib(), return_masks=True)
    b = gp.sparsify_checkpoint(saved, tmp_path / "b", _calib(), return_masks=True,
                               offload_bytes=0)
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # offload folder removed


def test_missing_shard_is_named(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    files = sorted(saved.iterdir())
    for f in files:
        (broken / f.name).write_bytes(f.read_bytes())
    gone = sorted(broken.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ArtifactError, match=gone.name):
        gp.sparsify_checkpoint(broken, tmp_path / "out", _calib())
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_leaves_no_partial_output(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    bad = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (broken / bad).write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match=bad):
        gp.sparsify_checkpoint(broken, tmp_path / "out", _calib())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no staging folder left


def test_not_a_decoder_stack(tmp_path):
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError,
                       match=r"'bert' checkpoint of \['BertModel'\], not a causal.*Llama"):
        gp.sparsify_checkpoint(tmp_path / "bert", tmp_path / "out", [torch.zeros(1, 4).long()])


def test_not_enough_disk_space(saved, tmp_path):
    with pytest.raises(ArtifactError, match="not enough disk space.*GiB free"):
        gp.sparsify_checkpoint(saved, tmp_path / "out", _calib(), keep_free=1 << 60)
    assert not (tmp_path / "out").exists()


def test_bad_options(saved, tmp_path):
    with pytest.raises(ConfigError, match="method='taylor'.*gp.sparsify"):
        gp.sparsify_checkpoint(saved, tmp_path / "out", _calib(), method="taylor")
    with pytest.raises(ConfigError, match="needs calibration data"):
        gp.sparsify_checkpoint(saved, tmp_path / "out", None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ArtifactError, match="exists"):
        gp.sparsify_checkpoint(saved, tmp_path / "taken", _calib())


def test_sparsify_points_a_checkpoint_folder_to_sparsify_checkpoint(saved):
    with pytest.raises(ConfigError, match="gp.sparsify_checkpoint"):
        gp.sparsify(saved, calib=_calib(), method="wanda")
