"""``gp.compile`` of a graph carrying quantization specs (``PruneGraph.quant``, issue 18):
quantized Linears run our INT8 kernels, the manifest says which layer runs what, and the
artifact computes what the fake-quant model computes (numpy reference from
``graphprune.ir.quant``) within one quantization step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphprune.codegen.kernels.cpu_int8 import int8_isa
from graphprune.codegen.target import make_target
from torch import nn

from graphprune import codegen
from graphprune.api.graph import capture
from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import QuantSpec, fake_quantize, fake_quantize_act, weight_scales

ISA = int8_isa(make_target("llvm"))


class MLP(nn.Module):
    """A token MLP on [batch, seq, features] at widths that are not whole vectors (45, 37)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(29, 45)
        self.fc2 = nn.Linear(45, 37)
        self.head = nn.Linear(37, 8)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def _setup(scheme_of):
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(2, 5, 29),)
    pg = capture(model, inputs)
    for name, scheme in scheme_of.items():
        w = model.state_dict()[name].numpy()
        act = 0.05 if scheme == "w8a8_static" else None
        pg.quant[name] = QuantSpec(scheme, weight_scales(w, 0), 0, act)
    return model, inputs, pg


def _reference(model, x, pg):
    """The fake-quant forward in numpy, and a bound on how far a correct artifact may be from it.

    The artifact's int32 sums are exact, so it differs from the reference by float32 rounding
    only (|d| <= 1e-4 (1 + |h|) here, far above it) until a quantizer sees an input that moved
    by that rounding: then a quantized value may land one step (s_x) away. A quantized layer's
    output may thus differ by its input step times sum_k |W[n, k]| (every input one step off),
    and every later layer carries that through |W|: the bound is that sum, not a fixed atol.
    """
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    h, bound, first = x, np.zeros(1, np.float32), True
    for layer in ("fc1", "fc2", "head"):
        w, b = sd[f"{layer}.weight"], sd[f"{layer}.bias"]
        spec = pg.quant.get(f"{layer}.weight")
        bound = bound @ np.abs(w).T if bound.ndim > 1 else bound
        if spec is not None:
            w = fake_quantize(w, spec)
            if spec.scheme != "w8":
                s = np.abs(h).max(-1, keepdims=True) / 127 if spec.act_scale is None else (
                    np.float32(spec.act_scale))  # fmt: skip
                if not first:  # the model input reaches fc1's quantizer unchanged
                    bound = bound + s * np.abs(w).sum(1)
            h = fake_quantize_act(h, spec.scheme, spec.act_scale)
        h = h @ w.T + b
        bound = bound + 1e-4 * (1 + np.abs(h))
        first = False
        if layer == "fc1":
            h = np.maximum(h, 0)
    return h, bound


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_artifact_matches_the_fake_quant_model(tmp_path, static):
    scheme = "w8a8_static" if static else "w8a8_dynamic"
    names = {"fc1.weight": scheme, "fc2.weight": scheme, "head.weight": "w8"}
    model, inputs, pg = _setup(names)
    art = codegen.compile(model, inputs, out_dir=tmp_path / "a", graph=pg)
    kern = art.manifest["kernels"]
    for name in ("fc1.weight", "fc2.weight"):
        assert kern[f"quant:{name}"] == {"kernel": "int8", "scheme": scheme, "isa": ISA,
                                         "shape": list(model.state_dict()[name].shape),
                                         "batch": 10, "bias": name.replace("weight", "bias"),
                                         # hand-made specs: no measured error; no budget given
                                         "rel_error": None, "int8_tolerance": None}  # fmt: skip
    assert kern["quant:head.weight"]["kernel"] == "fp32"  # w8: dequantized weights in fp32
    # the bias went into the int8 kernels' epilogue: no separate add for fc1/fc2
    assert not any("add" in k for k in kern if "fc" in k), sorted(kern)
    got = np.asarray(art(inputs[0]))
    want, bound = _reference(model, inputs[0].numpy(), pg)
    err = np.abs(got - want)
    assert np.all(err <= bound), float((err / bound).max())
    # most outputs agree to float rounding; the one-step flips are rare
    assert np.mean(err <= 1e-4 * (1 + np.abs(want))) > 0.9
    # and the int8 path is not a silent fp32 one: the fp32 model is further away
    fp = model(inputs[0]).detach().numpy()
    assert np.abs(fp - want).max() > 10 * err.max()


def test_quant_spec_for_a_foreign_weight_is_a_config_error(tmp_path):
    model, inputs, pg = _setup({})
    pg.quant["nope.weight"] = QuantSpec("w8a8_dynamic", np.ones(3, np.float32), 0)
    with pytest.raises(ConfigError, match="nope.weight"):
        codegen.compile(model, inputs, out_dir=tmp_path / "a", graph=pg)
    model, inputs, pg = _setup({})
    pg.quant["fc1.weight"] = QuantSpec("w8a8_dynamic", np.ones(3, np.float32), 0)
    with pytest.raises(ConfigError, match="fc1.weight.*3 weight scales for 45"):
        codegen.compile(model, inputs, out_dir=tmp_path / "b", graph=pg)


def test_onnx_gemm_form_quantized_with_bias_fused(tmp_path):
    """The ONNX importer's forms: a 3-D input exports as ``MatMul`` with the weight stored
    transposed (``[K, N]``, output channels on axis 1) and ``add(matmul, bias)``, bias second.
    The specs are keyed by the ONNX initializer names, as the ONNX frontend's graph is."""
    import onnx
    from onnx import numpy_helper

    model, inputs, _ = _setup({})
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])  # fmt: skip
    proto = onnx.load(str(path))
    pg = capture(proto)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    ref_pg = type("G", (), {"quant": {}})()
    onnx_name = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        for layer in ("fc1", "fc2"):
            if arr.shape == sd[f"{layer}.weight"].T.shape and np.array_equal(arr.T, sd[f"{layer}.weight"]):
                onnx_name[layer] = init.name
                scales = weight_scales(arr, 1)
                pg.quant[init.name] = QuantSpec("w8a8_dynamic", scales, 1)
                ref_pg.quant[f"{layer}.weight"] = QuantSpec("w8a8_dynamic", scales, 0)
    assert sorted(onnx_name) == ["fc1", "fc2"], onnx_name
    art = codegen.compile(proto, (inputs[0].numpy(),), out_dir=tmp_path / "a", graph=pg)
    kern = art.manifest["kernels"]
    assert kern[f"quant:{onnx_name['fc1']}"]["kernel"] == "int8", kern
    assert kern[f"quant:{onnx_name['fc2']}"].get("bias") == "fc2.bias", kern
    want, bound = _reference(model, inputs[0].numpy(), ref_pg)
    got = np.asarray(art(inputs[0].numpy()))
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w8a8_static"])
def test_compile_of_a_quantize_result_matches_its_fake_quant_model(tmp_path, scheme):
    """gp.compile(gp.quantize(...)): the artifact against part 1's torch fake-quant model (input
    hooks and int8-grid weights), within the one-step bound of _reference."""
    import graphprune as gp

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 5, 29)
    calib = [(torch.randn(2, 5, 29),) for _ in range(2)] + [(x,)]
    res = gp.quantize(model, (x,), scheme=scheme, calib=calib, exclude=[])
    art = codegen.compile(res, (x,), out_dir=tmp_path / "a")
    kern = art.manifest["kernels"]
    assert {kern[f"quant:{n}.weight"]["kernel"] for n in ("fc1", "fc2", "head")} == {"int8"}
    with torch.no_grad():
        want = res.model(x).numpy()
    _, bound = _reference(model, x.numpy(), res.graph)
    err = np.abs(np.asarray(art(x)) - want)
    assert np.all(err <= bound), float((err / bound).max())
    assert np.mean(err <= 1e-4 * (1 + np.abs(want))) > 0.9


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["hf_bert_tiny", "llama_tiny", "vit_tiny"])
def test_zoo_models_quantized_and_compiled(tmp_path, name):
    """gp.quantize (W8A8 dynamic) then gp.compile on zoo transformers: every Linear runs int8;
    the artifact matches the fake-quant torch model to float rounding where every quantized
    layer is a Linear (BERT, Llama). ViT's patch-embedding conv stays fp32 on an unquantized
    input (no int8 conv): there a loose bound, 3% of the output range."""
    import graphprune as gp
    from graphprune import models

    model, inputs = models.get(name)
    res = gp.quantize(model, inputs, scheme="w8a8_dynamic")
    art = codegen.compile(res, inputs, out_dir=tmp_path / "a")
    recs = {k: v for k, v in art.manifest["kernels"].items() if k.startswith("quant:")}
    assert recs and all(v["kernel"] == "int8" or "conv" in v.get("reason", "") for v in recs.values())
    with torch.no_grad():
        want = res.model(*inputs)
    want = want[0] if isinstance(want, tuple) else getattr(want, "logits", want)
    got = art(*inputs)
    got = got[0] if isinstance(got, tuple) else got
    err = np.abs(np.asarray(got) - want.numpy()).max()
    tol = 0.03 if name == "vit_tiny" else 1e-4
    assert err <= tol * max(1.0, float(want.abs().max())), err


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_linears_reading_one_input_share_its_quantizer(tmp_path):
    """Q, K and V read the same activations (torch.export reshapes them separately): one
    activation quantizer feeds the three int8 GEMMs (no build needed to see it)."""
    from graphprune.codegen.lower import lower
    from graphprune.codegen.quant_rewrite import rewrite_quant

    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 3, 32)
    quant = {f"{n}.weight": QuantSpec("w8a8_dynamic", weight_scales(
        model.state_dict()[f"{n}.weight"].numpy(), 0), 0) for n in "qkv"}  # fmt: skip
    new, records = rewrite_quant(lower(model, (x,)), make_target("llvm"), quant)
    assert {r["kernel"] for r in records.values()} == {"int8"}
    text = new.mod["main"].script()
    assert text.count("R.call_tir(int8_gemm") == 3, text
    assert text.count("R.call_tir(int8_quantize_rows") == 1, text
    # and the shared quantizer computes what three separate ones would
    pg = capture(model, (x,))
    pg.quant.update(quant)
    got = np.asarray(codegen.compile(model, (x,), out_dir=tmp_path / "a", graph=pg)(x))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    xq = fake_quantize_act(x.numpy(), "w8a8_dynamic")
    lin = {n: xq @ fake_quantize(sd[f"{n}.weight"], quant[f"{n}.weight"]).T + sd[f"{n}.bias"]
           for n in "qkv"}  # fmt: skip
    want = lin["q"] * lin["k"] + lin["v"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

