"""Zoo models build deterministically, run, export, and still contain their coupling cases.

ONNX export is not run here (about 1.5 s a model); it was checked by hand for every factory.
"""

import subprocess
import sys

import pytest
import torch

from graphprune import models

NAMES = sorted(models.ZOO)

# The ops that make each model worth having; if a refactor loses one, the model no longer tests
# the coupling case it is there for.
EXPECTED_OPS = {
    "resnet_tiny": {"aten.add.Tensor", "aten.batch_norm.default"},
    "resnet_bottleneck_tiny": {"aten.add.Tensor", "aten.batch_norm.default"},
    "vgg_tiny": {"aten.flatten.using_ints", "aten.max_pool2d.default"},
    "mobilenetv2_tiny": {"aten.add.Tensor", "aten.hardtanh.default"},
    "shufflenet_tiny": {"aten.chunk.default", "aten.cat.default", "aten.transpose.int"},
    "densenet_tiny": {"aten.cat.default", "aten.avg_pool2d.default"},
    "unet_tiny": {
        "aten.cat.default",
        "aten.conv_transpose2d.input",
        "aten.group_norm.default",
        "aten.upsample_nearest2d.vec",
    },
    "digits_cnn": {"aten.flatten.using_ints"},
    "vit_tiny": {"aten.unbind.int", "aten.softmax.int", "aten.cat.default", "aten.select.int"},
    "vit_tiny_sdpa": {"aten.scaled_dot_product_attention.default", "aten.select.int"},
    "llama_tiny": {
        "aten.repeat_interleave.self_int",
        "aten.rsqrt.default",
        "aten.scaled_dot_product_attention.default",
        "aten.embedding.default",
    },
    "llama_tiny_tied": {"aten.repeat_interleave.self_int", "aten.embedding.default"},
    "hf_bert_tiny": {"aten.scaled_dot_product_attention.default"},
    "hf_gpt2_tiny": {"aten.addmm.default", "aten.split.Tensor"},
    "hf_llama_tiny": {"aten.scaled_dot_product_attention.default", "aten.rsqrt.default"},
    "maxvit_tiny": {"aten.permute.default", "aten.softmax.int", "aten.conv2d.default",
                    "aten.batch_norm.default"},
    "swin_tiny": {"aten.roll.default", "aten.index.Tensor", "aten.softmax.int", "aten.permute.default"},
    "hf_vit_tiny": {"aten.conv2d.default", "aten.scaled_dot_product_attention.default"},
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_registry_covers_expected_ops_table():
    assert set(EXPECTED_OPS) == set(models.ZOO)
    assert models.DEFAULT_MODEL in models.ZOO


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_deterministic_per_seed(name):
    model_a, inputs_a = models.get(name, seed=0)
    model_b, inputs_b = models.get(name, seed=0)
    model_c, _ = models.get(name, seed=1)
    assert not model_a.training
    assert all(x.shape[0] == 2 for x in inputs_a)
    with torch.no_grad():
        out_a = _as_tuple(model_a(*inputs_a))
        out_b = _as_tuple(model_b(*inputs_b))
        out_c = _as_tuple(model_c(*inputs_a))
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(out_a[0], out_c[0])


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_matches_eager_and_keeps_coupling_ops(name):
    model, inputs = models.get(name)
    with torch.no_grad():
        expected = _as_tuple(model(*inputs))
        ep = torch.export.export(model, inputs)
        got = _as_tuple(ep.module()(*inputs))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert EXPECTED_OPS[name] <= ops, EXPECTED_OPS[name] - ops


def test_structural_cases_present():
    shufflenet, _ = models.get("shufflenet_tiny")
    groups = {m.groups for m in shufflenet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {2, 4} <= groups

    mobilenet, _ = models.get("mobilenetv2_tiny")
    assert any(
        m.groups == m.in_channels == m.out_channels > 1
        for m in mobilenet.modules()
        if isinstance(m, torch.nn.Conv2d)
    )

    vgg, (x,) = models.get("vgg_tiny")
    assert vgg.features(x).shape[-1] > 1

    llama, _ = models.get("llama_tiny")
    tied, _ = models.get("llama_tiny_tied")
    attn = llama.layers[0].attn
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (4, 2, 8)
    assert llama.lm_head.weight is not llama.embed_tokens.weight
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_unknown_name_lists_known_models():
    with pytest.raises(KeyError, match="resnet_tiny"):
        models.get("resnet_huge")


def test_import_is_lazy():
    code = "import sys, graphprune.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
