"""Encoder-only ``transformers`` models: ``T5EncoderModel`` and ``WhisperEncoder``.

Pruned zero-config, each stays its class with a config that rebuilds it; it runs at three
shapes, with and without an attention mask where the class reads one; removed channels are
exactly the dead ones of the original (the oracle, at two shapes); and ``save_pretrained`` →
the class's own ``from_pretrained`` in a fresh process without graphprune gives identical
outputs. (Neither class has an ``AutoModel`` mapping of its own: ``AutoModel`` builds the full
encoder-decoder for their configs, so the plain reload is ``T5EncoderModel.from_pretrained``.)

What each config can express: T5 has ``num_heads`` and ``d_kv`` (so whole heads and the MLP
width ``d_ff`` shrink; its relative position bias, one column per head, shrinks with them);
Whisper computes the head size as ``d_model ÷ heads``, so only ``encoder_ffn_dim`` shrinks; its
convolutional front end has no config field. Whisper's forward requires exactly
``2 * max_source_positions`` frames, so only its batch varies.
"""

from __future__ import annotations

import os

import pytest
import torch
from hf_helpers import dead_copy, pruned, run_script

pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

FAMILIES = ["t5", "whisper"]

# Fresh process, no graphprune: each directory's class from its config, its own
# from_pretrained, inputs and outputs as safetensors.
PLAIN_CLASS = r"""
import importlib, sys
import transformers
from safetensors.torch import load_file, save_file
out = {}
for d in sys.argv[1:]:
    cfg = transformers.AutoConfig.from_pretrained(d)
    name = cfg.architectures[0]
    cls = getattr(transformers, name, None) or getattr(importlib.import_module(
        f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}"), name)
    m = cls.from_pretrained(d).eval()
    o = m(**load_file(d + "/inputs.safetensors"))
    out[d] = o.last_hidden_state.detach().contiguous()
assert "graphprune" not in sys.modules
save_file({str(i): t for i, t in enumerate(out.values())}, sys.argv[1] + "/outputs.safetensors")
"""


@pytest.fixture(scope="module", params=FAMILIES)
def result(request):
    return request.param, *pruned(request.param)


def _batch(family: str, batch: int, seq: int, masked: bool, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "whisper":  # the time axis is fixed by max_source_positions; no mask read
        return {"input_features": torch.randn(batch, 16, 64, generator=g)}
    kw = {"input_ids": torch.randint(0, 128, (batch, seq), generator=g)}
    if masked:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq // 2 :] = 0  # padding at the end of the first row
        kw["attention_mask"] = mask
    return kw


SHAPES = ((1, 5), (3, 16), (4, 40))


def test_zero_config_prune_keeps_class_and_config(result):
    family, model, _, res = result
    assert res.report.form == "module"
    assert type(res.model) is type(model)
    assert res.report.params_after < res.report.params_before
    assert any("reloads with transformers' own from_pretrained" in n for n in res.report.notes)
    cfg = res.model.config
    if family == "t5":
        assert (cfg.num_heads, cfg.d_kv, cfg.d_ff) == (2, 16, 64)
        for block in res.model.encoder.block:
            attn = block.layer[0].SelfAttention
            assert (attn.n_heads, attn.inner_dim) == (2, 32)
        bias = res.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        assert bias.weight.shape == (32, 2)  # one column per remaining head
    else:
        assert (cfg.encoder_attention_heads, cfg.encoder_ffn_dim, cfg.d_model) == (4, 64, 64)
        notes = "\n".join(res.report.notes)
        assert "left heads unpruned" in notes and "hidden_size ÷ num_attention_heads" in notes
        assert res.model.conv1.out_channels == 64  # no config field: left alone
    assert model.config.hidden_size == 64  # the user's model is untouched


@pytest.mark.parametrize("masked", [False, True])
def test_runs_at_three_shapes_and_matches_the_dead_channel_oracle(result, masked):
    family, model, _, res = result
    if family == "whisper" and masked:
        pytest.skip("WhisperEncoder reads no attention mask")
    ref = dead_copy(model, res)
    for i, (batch, seq) in enumerate(SHAPES):
        kw = _batch(family, batch, seq, masked, seed=i)
        with torch.no_grad():
            got = res.model(**kw).last_hidden_state
        want_len = 32 if family == "whisper" else seq
        assert got.shape == (batch, want_len, 64)
        if i:  # the oracle at two shapes other than the captured one
            with torch.no_grad():
                want = ref(**kw).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_save_pretrained_reloads_with_plain_transformers(tmp_path):
    dirs, want = [], []
    for family in FAMILIES:
        _, _, res = pruned(family)
        d = str(tmp_path / family)
        res.model.save_pretrained(d)
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(d))
        x = _batch(family, 3, 11, masked=True)
        safetensors.save_file(x, os.path.join(d, "inputs.safetensors"))
        with torch.no_grad():
            want.append(res.model(**x).last_hidden_state)
        dirs.append(d)
    got = run_script(PLAIN_CLASS, *dirs)
    for i, family in enumerate(FAMILIES):
        assert got[str(i)].shape == want[i].shape, family
        torch.testing.assert_close(got[str(i)], want[i], atol=1e-6, rtol=1e-5, msg=family)
