"""sparsify's contract: bad input, immutability, inplace, exclusions, sequential calibration, ONNX."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.ir.errors import ConfigError
from graphprune.api.sparsify import sparsify
from graphprune.passes.sparsity.patterns import prune_count


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=None):
        return x + torch.relu(self.fc(x)) * scale


class _Stack(nn.Module):
    """embed -> 3 residual blocks (ModuleList, keyword arg) -> head."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, scale=2.0)
        return self.head(h)


def _stack():
    torch.manual_seed(0)
    return _Stack()


def _x(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 4, generator=g) for _ in range(n)]


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_sequential_calibration_feeds_sparsified_outputs():
    """Oracle: block i's Wanda mask comes from inputs produced by pruned blocks 0..i-1."""
    model, calib = _stack(), _x()
    res = sparsify(model, method="wanda", calib=calib, exclude=["embed", "head"])
    assert res.report.calibration == "sequential over blocks (3 blocks)"
    ref = copy.deepcopy(model)
    with torch.no_grad():
        hs = [ref.embed(x) for x in calib]
        for i, blk in enumerate(ref.blocks):
            xin = torch.cat(hs)
            score = blk.fc.weight.abs() * xin.norm(dim=0, keepdim=True)
            keep = torch.ones_like(score, dtype=torch.bool)
            keep.scatter_(1, torch.topk(score, 4, dim=1, largest=False).indices, False)
            assert torch.equal(res.masks[f"blocks.{i}.fc.weight"], keep), i
            blk.fc.weight.mul_(keep)
            hs = [blk(h, scale=2.0) for h in hs]
    torch.testing.assert_close(res.model(calib[0]), ref(calib[0]))


def test_zero_sparsity_is_identity_and_input_untouched():
    model, calib = _stack(), _x()
    before = _params(model)
    for method in ("magnitude", "wanda", "sparsegpt", "obd"):
        res = sparsify(model, sparsity=0.0, method=method, calib=calib)
        assert all(m.all() for m in res.masks.values())
        torch.testing.assert_close(res.model(calib[0]), model(calib[0]), atol=1e-5, rtol=1e-5)
        res = sparsify(model, sparsity=0.5, method=method, calib=calib)
        assert res.model is not model
    for k, v in _params(model).items():
        assert torch.equal(v, before[k]), k


def test_inplace_writes_into_the_model():
    model, calib = _stack(), _x()
    res = sparsify(model, method="sparsegpt", calib=calib, inplace=True)
    assert res.model is model
    for name, mask in res.masks.items():
        assert (dict(model.named_parameters())[name][~mask] == 0).all()


def test_defaults_exclude_head_and_embeddings_and_report_says_so():
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    res = sparsify(emb, torch.tensor([[1, 2, 3]]))
    assert set(res.masks) == {"1.weight"}
    assert "embedding" in res.report.excluded["0"]
    assert "output head" in res.report.excluded["2"]
    assert "output head" in res.report.to_text()
    res = sparsify(emb, torch.tensor([[1, 2, 3]]), exclude=[])
    assert set(res.masks) == {"1.weight", "2.weight"}
    res = sparsify(emb, exclude=["1", "nope*"])
    assert set(res.masks) == {"2.weight"}
    assert any("nope*" in n for n in res.report.notes)


def test_indivisible_layers_are_left_dense_and_reported():
    m = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    res = sparsify(m, pattern="2:4")
    assert set(res.masks) == {"1.weight"}
    assert "not divisible by M=4" in res.report.excluded["0"]
    assert torch.equal(res.model[0].weight, m[0].weight)
    with pytest.raises(ConfigError, match="no layer left"):
        sparsify(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)), pattern="2:4")


def test_conv_reduction_dim_is_cin_kh_kw():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, (1, 2)), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    m(x)
    res = sparsify(m, x, pattern="2:4", method="wanda", calib=[x])
    assert "0" in res.report.excluded  # 3*3*3 = 27 is not divisible by 4
    mask = res.masks["1.weight"].reshape(8, -1)  # 8*1*2 = 16
    assert (mask.reshape(8, -1, 4).sum(-1) == 2).all()
    res = sparsify(m, x, pattern="unstructured", method="sparsegpt", calib=[x, x * 0.5])
    assert res.report.layers[0].rel_error is not None


BAD = [
    (dict(pattern="2:2"), "pattern"),
    (dict(pattern="3:2"), "pattern"),
    (dict(pattern="block:3"), "pattern"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity="half"), "sparsity"),
    (dict(pattern="2:4", sparsity=0.7), "sparsity"),
    (dict(method="wanda"), "calib"),
    (dict(method="sparsegpt", calib=[]), "calib"),
    (dict(method="snip"), "calib"),
    (dict(method="synflow"), "example_inputs"),
    (dict(method="prune_everything"), "method"),
    (dict(scope="model"), "scope"),
    (dict(scope="global", pattern="2:4"), "scope"),
    (dict(method="sparsegpt", calib=_x(), pattern="block:4x4"), "sparsegpt"),
    (dict(min_keep=2.0), "min_keep"),
    (dict(percdamp=-1.0), "percdamp"),
    (dict(blocksize=0), "blocksize"),
    (dict(exclude="head"), "exclude"),
]


@pytest.mark.parametrize("kwargs, word", BAD)
def test_bad_input_raises_config_error_and_changes_nothing(kwargs, word):
    model = _stack()
    before = _params(model)
    with pytest.raises(ConfigError, match=word):
        sparsify(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())


def test_non_finite_weights_and_activations():
    model = _stack()
    with torch.no_grad():
        model.blocks[1].fc.weight[0, 0] = float("nan")
    before = _params(model)
    with pytest.raises(ConfigError, match=r"blocks\.1\.fc\.weight.*NaN"):
        sparsify(model, inplace=True)
    assert all(torch.equal(v.nan_to_num(), before[k].nan_to_num())
               for k, v in _params(model).items())
    model = _stack()
    before = _params(model)
    bad = [_x()[0], torch.full((16, 4), float("inf"))]
    with pytest.raises(ConfigError, match="NaN/inf"):
        sparsify(model, method="sparsegpt", calib=bad, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())


def test_loss_method_without_labels_says_how_to_fix():
    with pytest.raises(ConfigError, match="loss_fn"):
        sparsify(_stack(), method="taylor", calib=_x())
    res = sparsify(_stack(), method="taylor", calib=_x(),
                   loss_fn=lambda m, b: m(b).pow(2).mean())
    assert res.report.total_sparsity == pytest.approx(0.5, abs=0.01)


def _nan_weight_stack():
    model = _stack()
    with torch.no_grad():
        model.blocks[1].fc.weight[0, 0] = float("nan")
    return model


def _other_models_graph():
    return gp.capture(nn.Linear(3, 3), (torch.randn(2, 3),))


USER_ERRORS = [
    *[pytest.param(lambda kw=kw: gp.sparsify(_stack(), **kw), id=f"bad-{word}-{i}")
      for i, (kw, word) in enumerate(BAD)],
    pytest.param(lambda: gp.sparsify(_nan_weight_stack()), id="nan-weight"),
    pytest.param(lambda: gp.sparsify(_stack(), method="sparsegpt",
                                     calib=[torch.full((16, 4), float("inf"))]), id="inf-calib"),
    pytest.param(lambda: gp.sparsify(_stack(), method="taylor", calib=_x()), id="no-loss-fn"),
    pytest.param(lambda: gp.sparsify("model.onnx"), id="path-not-model"),
    pytest.param(lambda: gp.sparsify(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)),
                                     pattern="2:4"), id="no-layer-left"),
    pytest.param(lambda: gp.sparsify(_stack(), _x()[0], graph=_other_models_graph()),
                 id="graph-of-another-model"),
]


@pytest.mark.parametrize("call", USER_ERRORS)
def test_every_user_error_is_caught_by_the_public_root(call):
    """``except gp.GraphPruneError`` catches every mistake a user can make with gp.sparsify (no
    ValueError/TypeError/KeyError escapes), and the message says what is wrong."""
    try:
        call()
    except gp.GraphPruneError as e:
        assert str(e)
    else:
        pytest.fail("no error raised")


# ---- ONNX --------------------------------------------------------------------------------


def _onnx_model():
    """x(2,16) -> MatMul W1(16,8) -> Gemm W2(4,8) transB=1 -> y(2,4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
         helper.make_node("Gemm", ["h", "W2"], ["y"], name="gemm", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_magnitude_nm_along_reduction_axis():
    import onnxruntime as ort
    from onnx import numpy_helper

    model = _onnx_model()
    orig = model.SerializeToString()
    res = sparsify(model, pattern="2:4", exclude=[])
    assert model.SerializeToString() == orig  # input untouched
    w = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    # MatMul W1 is (K=16, N=8): groups of 4 run down axis 0
    assert ((w["W1"] != 0).reshape(4, 4, 8).sum(1) == 2).all()
    # Gemm transB: W2 is (N=4, K=8): groups run along axis 1
    assert ((w["W2"] != 0).reshape(4, 2, 4).sum(2) == 2).all()
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    y = ort.InferenceSession(res.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x @ w["W1"]) @ w["W2"].T, rtol=1e-4, atol=1e-4)
    res = sparsify(model, sparsity=0.25, method="random")
    assert set(res.masks) == {"W1"} and "output head" in res.report.excluded["W2"]
    assert int((~res.masks["W1"]).sum()) == prune_count(0.25, 128)


def test_onnx_calibration_methods_not_available_yet():
    with pytest.raises(ConfigError, match="not available for ONNX"):
        sparsify(_onnx_model(), method="wanda", calib=[np.zeros((2, 16), np.float32)])


def test_gp_sparsify_records_masks_on_the_graph():
    import graphprune as gp
    from graphprune import models

    model, x = models.get("vit_tiny")
    pg = gp.capture(model, x)
    res = gp.sparsify(model, x, sparsity=0.5, pattern="2:4", method="magnitude", graph=pg)
    assert set(pg.masks) == set(res.masks) and pg.masks
    for name, m in pg.masks.items():
        assert m.shape == tuple(pg.weights[name].shape)
        groups = m.reshape(m.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
