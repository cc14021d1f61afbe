"""gp.quantize on torch and ONNX models: masks kept, SmoothQuant exact in float, the QDQ ONNX model
runs in onnxruntime and matches the fake-quantized torch module, bad options are named."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import onnx
import pytest
import torch
from graphprune.passes.quant.calibrate import observe_torch
from graphprune.passes.quant.smooth import find_smooth_pairs, migrate, smooth_factors
from graphprune.passes.sparsity.targets import find_targets
from helpers import export_onnx
from torch import nn

import graphprune as gp
from graphprune.api.quantize import quantize
from graphprune.frontends.onnx.session import run_onnx
from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import QMAX, fake_quantize_act
from graphprune.ir.verify import verify


class Block(nn.Module):
    """A pre-norm transformer MLP, x -> x + fc2(relu(fc1(ln(x)))) + proj(ln(x)), plus a head.

        x -> ln -> fc1 -> relu -> fc2 -> add -> ln2 -> head
              \\-> proj ----------------/     \\-> add (residual)
    ln feeds only linears (smoothable); ln2 feeds the head and a residual add (not)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2, self.proj = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, d)
        self.ln2, self.head = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        y = x + self.fc2(torch.relu(self.fc1(h))) + self.proj(h)
        g = self.ln2(y)
        return self.head(g) + g


def _model(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    m = Block().eval()
    with torch.no_grad():  # activation outliers in two channels, as in LLMs (what SmoothQuant targets)
        m.ln.weight[3] = 20.0
        m.ln.weight[7] = -15.0
    return m


def _batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 16, generator=g) for _ in range(n)]


def test_masks_kept_and_sparse_weights_stay_sparse() -> None:
    m, calib = _model(), _batches()
    sp = gp.sparsify(m, calib[0], sparsity=0.6, method="magnitude", exclude=[])
    res = quantize(sp, scheme="w8a8_static", calib=calib, exclude=[])
    verify(res.graph)
    assert set(res.graph.masks) == set(sp.graph.masks) and res.graph.masks
    for name, keep in res.graph.masks.items():
        np.testing.assert_array_equal(keep, sp.graph.masks[name])
        w = res.model.get_parameter(name).detach().numpy()
        assert (w[~keep] == 0).all(), name  # pruned stays pruned after fake quantization
    assert set(res.graph.quant) == {"fc1.weight", "fc2.weight", "proj.weight", "head.weight"}
    assert sp.graph.quant == {}  # the prior result's graph is not changed
    # the prior result's model is not mutated: its weights are not on the int8 grid
    w = sp.model.fc1.weight.detach().numpy()
    s = res.graph.quant["fc1.weight"].weight_scale[:, None]
    assert not np.allclose(w / s, np.rint(w / s))


def test_fake_quant_module_matches_numpy_and_survives_copies() -> None:
    m, calib = _model(), _batches()
    res = quantize(m, calib[0], scheme="w8a8_dynamic", calib=calib)
    assert "head" in res.report.excluded  # the output head stays float by default
    spec = res.graph.quant["fc1.weight"]
    w = res.model.fc1.weight.detach().numpy()
    np.testing.assert_allclose(w, np.rint(w / spec.weight_scale[:, None]) * spec.weight_scale[:, None],
                               rtol=0, atol=1e-7)  # on the int8 grid
    x = calib[0]
    seen = {}
    h = res.model.fc1.register_forward_hook(lambda mod, a, o: seen.update(x=a[0]))
    out = res.model(x)
    h.remove()
    ln_out = m.ln(x).detach().numpy()  # fc1's input (ln is not quantized)
    np.testing.assert_allclose(seen["x"].detach().numpy(), fake_quantize_act(ln_out, "w8a8_dynamic"),
                               atol=1e-6)
    for clone in (copy.deepcopy(res.model), pickle.loads(pickle.dumps(res.model))):
        torch.testing.assert_close(clone(x), out)
    assert "fc1.input_scale" in res.model.state_dict()
    assert res.report.max_rel_error is not None and 0 < res.report.max_rel_error < 0.05


def test_smoothquant_leaves_the_float_model_unchanged() -> None:
    m, calib = _model(), _batches()
    pg = gp.capture(m, (calib[0],))
    pairs, skipped = find_smooth_pairs(pg)
    assert [p.linears for p in pairs] == [("fc1.weight", "proj.weight")]
    assert list(skipped) == ["layer_norm_1"] and "add" in skipped["layer_norm_1"]
    fc1 = next(t for t in find_targets(m) if t.name == "fc1")
    obs = observe_torch(m, [fc1], calib)["fc1"]
    arrays = {n: pg.weights[n] for n in (*pairs[0].scales, *pairs[0].linears)}
    s = smooth_factors(obs.chan_max, [arrays[w] for w in pairs[0].linears], 0.5)
    assert s[3] > 2 and s[7] > 2  # the outlier channels are scaled down the most
    sm = copy.deepcopy(m)
    gp.frontends.torch.fake_quant.write_params(sm, migrate(pairs[0], arrays, s))
    for x in calib:
        torch.testing.assert_close(sm(x), m(x), rtol=1e-4, atol=1e-5)
    # through the API: the smoothed linears are recorded, and smoothing lowers their error
    plain = quantize(m, scheme="w8a8_static", calib=calib)
    smooth = quantize(m, scheme="w8a8_static", calib=calib, smooth=0.5)
    assert smooth.report.smoothed == {"layer_norm": ["fc1.weight", "proj.weight"]}
    err = {r.layer: r.rel_error for r in plain.report.layers}
    serr = {r.layer: r.rel_error for r in smooth.report.layers}
    assert serr["fc1"] < err["fc1"]
    np.testing.assert_allclose(smooth.graph.weights["ln.weight"], m.ln.weight.detach() / s,
                               rtol=1e-6)  # the graph holds the smoothed (plain) weights


@pytest.mark.parametrize("scheme", ["w8", "w8a8_static", "w8a8_dynamic"])
def test_qdq_onnx_runs_in_ort_and_matches_the_torch_fake_quant(scheme: str) -> None:
    m, calib = _model(), _batches()
    proto = export_onnx(m, (calib[0],))
    tq = quantize(m, calib[0], scheme=scheme, calib=calib, exclude=[])
    oq = quantize(proto, scheme=scheme, calib=[c.numpy() for c in calib], exclude=[])
    ops = {n.op_type for n in oq.model.graph.node}
    assert "DequantizeLinear" in ops and ("QuantizeLinear" in ops) == (scheme == "w8a8_static")
    onnx.checker.check_model(oq.model)
    assert len(oq.specs) == 4
    int8 = [i for i in oq.model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 4
    for x in _batches(2, seed=7):
        # Graph optimizations off: with them ORT fuses a weight-only DequantizeLinear -> MatMul
        # into its dynamically quantized int8 MatMul, which quantizes the activation too (its
        # scheme, not ours). The optimized model must run; its numbers are ORT's.
        assert np.isfinite(run_onnx(oq.model, [x.numpy()])[0]).all()
        got = run_onnx(oq.model, [x.numpy()], optimize=False)[0]
        want = tq.model(x).detach().numpy()
        # One quantization step of the output: an input rounding that flips by one step between
        # the two runtimes (float summation order) moves an output by at most one int8 step of
        # the output's range, max|y| / 127.
        step = np.abs(want).max() / QMAX
        assert np.abs(got - want).max() <= step, (np.abs(got - want).max(), step)
        if scheme == "w8":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bad_options_name_what_to_fix(tmp_path) -> None:
    m, calib = _model(), _batches()
    with pytest.raises(ConfigError, match="scheme='int4'"):
        quantize(m, calib[0], scheme="int4")
    with pytest.raises(ConfigError, match="w8a8_static observes activations: pass calib="):
        quantize(m, calib[0], scheme="w8a8_static")
    with pytest.raises(ConfigError, match=r"smooth=1.5 is outside"):
        quantize(m, calib[0], smooth=1.5, calib=calib)
    with pytest.raises(ConfigError, match="need scheme='w8a8_static'"):
        quantize(m, calib[0], percentile=99.9, calib=calib)
    with pytest.raises(ConfigError, match="smooth= needs a torch model"):
        quantize(export_onnx(m, (calib[0],)), smooth=0.5, calib=[c.numpy() for c in calib])
    res = quantize(m, calib[0])
    with pytest.raises(ConfigError, match="already fake-quantized"):
        quantize(res.model, calib[0], exclude=[])
    with pytest.raises(ConfigError, match="exclude="):
        quantize(m, calib[0], exclude="head")
    with pytest.raises(ConfigError, match="graph= is not a capture of this model"):
        quantize(m, calib[0], graph="not a graph")


def test_mse_observer_never_does_worse_than_minmax_per_layer() -> None:
    m, calib = _model(), _batches()
    mm = quantize(m, calib[0], scheme="w8a8_static", calib=calib, exclude=[])
    mse = quantize(m, calib[0], scheme="w8a8_static", calib=calib, observer="mse", exclude=[])
    base = {r.layer: r for r in mm.report.layers}
    for r in mse.report.layers:  # min-max's range is one of the candidates the mse observer tries
        assert r.rel_error <= base[r.layer].rel_error + 1e-7, r.layer
        assert r.act_scale <= base[r.layer].act_scale * (1 + 1e-6)
