"""The quantize step in recipes, ``gp.run`` and the ``graphprune quantize`` command."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphprune as gp
from graphprune.app.cli import main
from graphprune.app.recipe import load_recipe
from graphprune.frontends.onnx.session import run_onnx
from graphprune.ir.errors import ConfigError

FACTORY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 8)).eval()
    return model, (torch.randn(4, 32),)
'''


@pytest.fixture
def factory(tmp_path) -> str:
    (tmp_path / "mlp.py").write_text(FACTORY)
    return f"{tmp_path / 'mlp.py'}:build"


def test_recipe_checks_the_quantize_section() -> None:
    r = load_recipe({"model": "resnet_tiny", "quantize": {}})
    assert r["quantize"]["scheme"] == "w8a8_dynamic" and r["quantize"]["smooth"] is None
    with pytest.raises(ConfigError, match="quantize.shceme: unknown key; did you mean 'scheme'"):
        load_recipe({"model": "resnet_tiny", "quantize": {"shceme": "w8"}})
    with pytest.raises(ConfigError, match="quantize.scheme w8a8_static observes activations: add "
                                          "a calib: section"):
        load_recipe({"model": "resnet_tiny", "quantize": {"scheme": "w8a8_static"}})
    with pytest.raises(ConfigError, match="quantize.smooth rewrites torch parameters"):
        load_recipe({"model": "m.onnx", "quantize": {"smooth": 0.5}, "calib": {}})
    with pytest.raises(ConfigError, match="use scheme w8a8_static"):
        load_recipe({"model": "resnet_tiny", "quantize": {"percentile": 99.9}})
    with pytest.raises(ConfigError, match="compile.int8_tolerance keeps layers over it in fp32"):
        load_recipe({"model": "resnet_tiny", "compile": {"int8_tolerance": 0.01}})
    r = load_recipe({"model": "resnet_tiny", "quantize": {}, "compile": {"int8_tolerance": 0.01}})
    assert r["compile"]["int8_tolerance"] == 0.01


def test_run_quantizes_after_sparsify_and_compiles(factory, tmp_path) -> None:
    res = gp.run({"model": factory, "sparsify": {"sparsity": 0.5},
                  "quantize": {"scheme": "w8a8_static", "exclude": []},
                  "compile": {"int8_tolerance": 1.0},
                  "calib": {"batches": 2}, "out": str(tmp_path / "art"), "report": False,
                  "verify": {"atol": 1e-3, "rtol": 1e-3}})  # fmt: skip
    q = res.summary["quantize"]
    assert q["scheme"] == "w8a8_static" and q["layers"] == 3 and q["max_rel_error"] < 0.05
    assert res.summary["verify"]["passed"]
    quant = [k for k in res.artifact.manifest["kernels"].values() if "int8_tolerance" in k]
    assert len(quant) == 3 and all(k["int8_tolerance"] == 1.0 for k in quant), quant
    # the returned model is the fake-quantized one; its sparse weights are still sparse
    w = res.model[0].weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_cli_quantize_writes_a_qdq_model_ort_runs(factory, tmp_path, capsys) -> None:
    out = tmp_path / "new" / "q.onnx"
    assert main(["quantize", factory, "-o", str(out), "--scheme", "w8a8_static"]) == 0
    text = capsys.readouterr().out
    assert "excluded" in text and "output head" in text  # the head stays float by default
    proto = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    got = run_onnx(proto, [x.numpy()], optimize=False)[0]
    model = __import__("runpy").run_path(factory.split(":")[0])["build"]()[0]
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # quantization error, not a bug
    assert main(["quantize", factory, "-o", str(tmp_path / "p.pt"), "--scheme", "w8",
                 "-q"]) == 0  # fmt: skip
    assert main(["quantize", factory, "-o", str(tmp_path / "x.pt"), "--scheme", "int4"]) == 2
    assert "scheme='int4'" in capsys.readouterr().err
    assert main(["quantize", factory, "-o", str(tmp_path / "x.bin")]) == 2
    assert main(["quantize", factory, "-o", str(out)]) == 2  # exists: needs --force
