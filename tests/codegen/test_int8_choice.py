"""Which kernel a quantized layer gets (codegen/quant_choice.py, ``gp.compile(kernels=,
int8_tolerance=)``, issue 18).

* ``int8_tolerance``: the layer whose measured int8 error (``QuantSpec.rel_error``, from
  ``gp.quantize``'s calibration) is above the tolerance runs fp32, the other int8; the
  artifact computes exactly that mix (numpy reference: the fp32 layer on its int8-grid weight
  and its *unquantized* input, the int8 one on its fake-quantized input), and the manifest
  says so per layer;
* a budget that cannot be checked (no measured error) or is not a number is a ConfigError;
* ``kernels="bsr"``: a 90%-sparse quantized layer runs the int8 1×4-block kernel and the
  artifact equals the fake-quant model to float rounding (its int32 sums are exact);
* ``kernels="auto"``: every candidate is timed and the record's choice is the fastest of its
  own times.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphprune.codegen.kernels.cpu_int8 import int8_isa
from graphprune.codegen.target import make_target
from torch import nn

import graphprune as gp
from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import fake_quantize, fake_quantize_act

ISA = int8_isa(make_target("llvm"))
needs_vnni = pytest.mark.skipif(ISA not in ("amx", "vnni"), reason="no AVX-512 VNNI")


def _quantized(calib=True, sparsity=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48)).eval()
    x = torch.randn(16, 64)
    prior = model
    if sparsity is not None:
        prior = gp.sparsify(model, x, sparsity=sparsity, pattern="unstructured", exclude=[])
    cal = [torch.randn(16, 64) for _ in range(3)] if calib else None
    return gp.quantize(prior, x, scheme="w8a8_dynamic", calib=cal, exclude=[]), x


def test_layer_over_the_tolerance_stays_fp32(tmp_path):
    res, x = _quantized()
    errs = {k: s.rel_error for k, s in res.graph.quant.items()}
    assert all(e is not None and e > 0 for e in errs.values()), errs
    worse = max(errs, key=errs.get)
    tol = (errs["0.weight"] + errs["2.weight"]) / 2  # between the two layers' errors
    art = gp.compile(res, (x,), out_dir=tmp_path / "a", int8_tolerance=tol)
    kern = art.manifest["kernels"]
    for name, err in errs.items():
        rec = kern[f"quant:{name}"]
        assert rec["kernel"] == ("fp32" if name == worse else "int8"), rec
        assert rec["rel_error"] == pytest.approx(err) and rec["int8_tolerance"] == tol
    assert "int8_tolerance" in kern[f"quant:{worse}"]["reason"]
    # what the artifact computes: each layer as its record says
    sd = {k: v.detach().numpy() for k, v in res.float_model().state_dict().items()}
    h = x.numpy()
    for i, name in enumerate(("0", "2")):
        spec = res.graph.quant[f"{name}.weight"]
        w = fake_quantize(sd[f"{name}.weight"], spec)
        if name != worse.split(".")[0]:
            h = fake_quantize_act(h, spec.scheme, None)
        h = h @ w.T + sd[f"{name}.bias"]
        if i == 0:
            h = np.maximum(h, 0)
    got = np.asarray(art(x.numpy()))
    # one-step flips of a quantizer after the first layer's float rounding are possible but
    # rare at this size; float rounding bounds the rest
    close = np.abs(got - h) <= 1e-4 * (1 + np.abs(h))
    assert close.mean() > 0.95, float(np.abs(got - h).max())
    # the all-int8 artifact differs: the tolerance changed what runs
    art8 = gp.compile(res, (x,), out_dir=tmp_path / "b")
    assert {r["kernel"] for k, r in art8.manifest["kernels"].items() if k.startswith("quant:")} \
        == {"int8"}  # fmt: skip
    assert np.abs(np.asarray(art8(x.numpy())) - got).max() > 1e-3


def test_unmeasured_or_bad_tolerance_is_a_config_error(tmp_path):
    res, x = _quantized(calib=False)
    with pytest.raises(ConfigError, match="no measured error.*0.weight|0.weight.*no measured"):
        gp.compile(res, (x,), out_dir=tmp_path / "a", int8_tolerance=0.05)
    with pytest.raises(ConfigError, match="int8_tolerance"):
        gp.compile(res, (x,), out_dir=tmp_path / "b", int8_tolerance=-1)
    model = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="without a quantized graph"):
        gp.compile(model, (torch.randn(2, 4),), out_dir=tmp_path / "c", int8_tolerance=0.1)


@needs_vnni
def test_forced_bsr_runs_the_int8_sparse_kernel(tmp_path):
    res, x = _quantized(sparsity=0.9)
    art = gp.compile(res, (x,), out_dir=tmp_path / "a", kernels="bsr")
    kern = art.manifest["kernels"]
    assert {kern[f"quant:{n}.weight"]["kernel"] for n in ("0", "2")} == {"int8_bsr"}
    assert all(kern[f"quant:{n}.weight"]["block_density"] < 0.5 for n in ("0", "2"))
    with torch.no_grad():
        want = res.model(x).numpy()
    got = np.asarray(art(x.numpy()))
    close = np.abs(got - want) <= 1e-4 * (1 + np.abs(want))
    assert close.mean() > 0.95, float(np.abs(got - want).max())


@pytest.mark.heavy  # builds and times 3 one-layer probes per shape (~50 s on a busy 2-core box)
@needs_vnni
def test_auto_keeps_the_fastest_of_its_measured_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_INT8_KERNEL_CACHE", str(tmp_path / "int8.json"))
    monkeypatch.setenv("GRAPHPRUNE_KERNEL_CACHE", str(tmp_path / "sparse.json"))
    res, x = _quantized(sparsity=0.9)
    art = gp.compile(res, (x,), out_dir=tmp_path / "a", kernels="auto")
    for n in ("0", "2"):
        rec = art.manifest["kernels"][f"quant:{n}.weight"]
        times = rec["times_ms"]
        assert set(times) == {"fp32", "int8", "int8_bsr"}, rec
        assert rec["kernel"] == min(times, key=times.get)
    assert (tmp_path / "int8.json").exists()  # decisions cached for the next compile


def test_gelu_after_a_quantized_linear_runs_in_its_epilogue(tmp_path):
    """Linear -> GELU (BERT's FFN): the int8 kernel applies bias and gelu, no separate
    elementwise kernel evaluates erf, and the artifact equals the fake-quant model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48)).eval()
    x = torch.randn(1, 16, 64)
    res = gp.quantize(model, (x,), scheme="w8a8_dynamic", calib=[(x,)], exclude=[])
    art = gp.compile(res, (x,), out_dir=tmp_path / "a")
    kern = art.manifest["kernels"]
    assert kern["quant:0.weight"]["activation"] == "gelu"
    assert "activation" not in kern["quant:2.weight"]
    assert not any("erf" in name for name in kern), sorted(kern)
    with torch.no_grad():
        want = res.model(x).numpy()
    got = np.asarray(art(x.numpy()))
    assert np.mean(np.abs(got - want) <= 1e-4 * (1 + np.abs(want))) > 0.95
