"""``compile(..., graph=)`` and ``compile(result)``: sparsity masks read from the IR.

Oracle: the masked dense math in numpy (``x @ (W * mask).T``), fp32, atol=rtol=1e-4 (sparse
kernels sum in another order). The models' weights are zero outside their masks *and* at some
kept positions inside, so the pattern the masks give differs from the one the zeros give:
detection from zeros and reading the masks lead to different, checkable kernel choices.
"""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.codegen import compiler
from graphprune.ir.errors import ConfigError


def two_of_four(shape, seed: int) -> np.ndarray:
    """A 2:4 keep-mask along the last axis (two kept per group of four)."""
    rng = np.random.default_rng(seed)
    n, k = shape
    order = rng.random((n, k // 4, 4)).argsort(axis=2).argsort(axis=2)
    return (order < 2).reshape(n, k)


def one_kept_zeroed(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``w`` zero outside ``keep`` and at the first kept position of each group of four, so
    the weight alone fits 1:4 while its mask is 2:4."""
    n, k = w.shape
    g = keep.reshape(n, k // 4, 4)
    first = (g.cumsum(axis=2) == 1) & g
    return (w * (keep & ~first.reshape(n, k))).astype(np.float32)


def masked_mlp(seed: int = 0):
    """Linear 64->48, ReLU, Linear 48->32 (no bias); returns (model, masks, x)."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32, bias=False)
    ).eval()
    masks = {}
    with torch.no_grad():
        for i, name in ((0, "0.weight"), (2, "2.weight")):
            keep = two_of_four(tuple(m[i].weight.shape), seed + i)
            m[i].weight.copy_(torch.from_numpy(one_kept_zeroed(m[i].weight.numpy(), keep)))
            masks[name] = keep
    return m, masks, torch.randn(4, 64)


def dense_math(m, masks, x) -> np.ndarray:
    w0 = m[0].weight.detach().numpy() * masks["0.weight"]
    w2 = m[2].weight.detach().numpy() * masks["2.weight"]
    h = np.maximum(x.numpy() @ w0.T + m[0].bias.detach().numpy(), 0)
    return h @ w2.T


def graph_with(m, x, masks):
    pg = gp.capture(m, (x,))
    pg.masks.update(masks)
    return pg


def sparse_records(art) -> list[dict]:
    return [v for k, v in art.manifest["kernels"].items() if k.startswith("sparse:")]


@pytest.mark.parametrize("kernels", ["nm", "csr"])
def test_graph_masks_decide_the_pattern_and_match_masked_math(tmp_path, kernels):
    """With graph=, the pattern is the mask's (2:4, density 0.5) although the weights alone
    fit 1:4 (density 0.25); without it, the zeros are detected (1:4). Both artifacts equal the
    masked dense math."""
    m, masks, x = masked_mlp()
    want = dense_math(m, masks, x)
    pg = graph_with(m, x, masks)
    art = compiler.compile(m, (x,), out_dir=tmp_path / "graph", kernels=kernels, graph=pg)
    np.testing.assert_allclose(art(x), want, rtol=1e-4, atol=1e-4)
    assert art.manifest["masks"] == "graph"
    recs = sparse_records(art)
    assert [r["sparsity"] for r in recs] == [kernels, kernels]
    assert [r["density"] for r in recs] == [0.5, 0.5]
    if kernels == "nm":
        assert [r["options"]["nm"] for r in recs] == [[2, 4], [2, 4]]

    plain = compiler.compile(m, (x,), out_dir=tmp_path / "plain", kernels=kernels)
    np.testing.assert_allclose(plain(x), want, rtol=1e-4, atol=1e-4)
    assert plain.manifest["masks"] == "detected"
    assert [r["density"] for r in sparse_records(plain)] == [0.25, 0.25]
    if kernels == "nm":
        assert [r["options"]["nm"] for r in sparse_records(plain)] == [[1, 4], [1, 4]]


def test_weight_nonzero_outside_its_mask_is_a_config_error(tmp_path):
    m, masks, x = masked_mlp()
    w = m[2].weight.detach().numpy()
    i, j = np.argwhere(w != 0)[0]
    stricter = dict(masks)
    stricter["2.weight"] = masks["2.weight"].copy()
    stricter["2.weight"][i, j] = False  # prunes a weight the model still uses
    with pytest.raises(ConfigError, match=r"'2\.weight'.*1 nonzeros"):
        compiler.compile(m, (x,), out_dir=tmp_path / "a", kernels="csr",
                         graph=graph_with(m, x, stricter))  # fmt: skip
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "bad, match",
    [({"9.weight": np.ones((48, 64), bool)}, "names no weight"),
     ({"0.weight": np.ones((64, 48), bool)}, "shape")],
)  # fmt: skip
def test_masks_of_another_model_are_config_errors(tmp_path, bad, match):
    m, _, x = masked_mlp()
    with pytest.raises(ConfigError, match=match):
        compiler.compile(m, (x,), out_dir=tmp_path / "a", graph=graph_with(m, x, bad))


def test_a_result_with_model_and_graph_compiles_its_model_with_its_masks(tmp_path):
    """Duck-typed: any object with ``.model`` and ``.graph``; a layer the graph has no mask for
    stays dense even where its weight has zeros."""
    m, masks, x = masked_mlp()
    only_first = {"0.weight": masks["0.weight"]}
    result = types.SimpleNamespace(model=m, graph=graph_with(m, x, only_first), report=None)
    art = compiler.compile(result, (x,), out_dir=tmp_path / "r", kernels="csr")
    np.testing.assert_allclose(art(x), dense_math(m, masks, x), rtol=1e-4, atol=1e-4)
    assert art.manifest["masks"] == "graph"
    first, second = sparse_records(art)
    assert first["sparsity"] == "csr"
    assert second["sparsity"] == "dense" and "no sparsity mask" in second["reason"]
    with pytest.raises(ConfigError, match="pass one"):
        compiler.compile(result, (x,), out_dir=tmp_path / "r2", graph=gp.capture(m, (x,)))


def test_prune_result_without_masks_detects_from_weights(tmp_path):
    """``gp.prune``'s result carries a graph with no masks: sparsity is detected as for a plain
    module, and the artifact is the pruned model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    res = gp.prune(model.eval(), (x,), ratio=0.5)
    art = compiler.compile(res, (x,), out_dir=tmp_path / "p")
    np.testing.assert_allclose(art(x), res.model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert art.manifest["masks"] == "detected"


def test_sparsify_with_graph_then_compile(tmp_path):
    """The documented flow: ``gp.sparsify(..., graph=pg)`` records the masks on the IR; the
    compile reads them (the excluded output layer stays dense)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    x = torch.randn(4, 64)
    pg = gp.capture(model.eval(), (x,))
    res = gp.sparsify(model, (x,), sparsity=0.8, graph=pg)
    assert pg.masks
    art = compiler.compile(res.model, (x,), out_dir=tmp_path / "s", kernels="csr", graph=pg)
    np.testing.assert_allclose(art(x), res.model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    kinds = {k: v["sparsity"] for k, v in art.manifest["kernels"].items() if k.startswith("sparse:")}
    assert kinds == {"sparse:p_0_weight": "csr", "sparse:p_2_weight": "dense"}


def test_onnx_matmul_weight_mask_is_transposed_with_it(tmp_path):
    """ONNX MatMul stores a Linear's weight as ``W.T`` (``[K, N]`` initializer): its mask, in
    the initializer's shape, is transposed with it (2:4 along K is the pattern chosen)."""
    import onnx

    m, masks, x = masked_mlp()
    buf = io.BytesIO()
    torch.onnx.export(m, (x,), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    matmul = next(n for n, dims in inits.items() if dims == (48, 32))  # 2.weight, transposed
    pg = gp.capture(proto)
    pg.masks.update({"0.weight": masks["0.weight"], matmul: masks["2.weight"].T})
    art = compiler.compile(proto, (x.numpy(),), out_dir=tmp_path / "o", kernels="nm", graph=pg)
    np.testing.assert_allclose(art(x.numpy()), dense_math(m, masks, x), rtol=1e-4, atol=1e-4)
    assert [r["options"]["nm"] for r in sparse_records(art)] == [[2, 4], [2, 4]]


def test_tied_weight_mask_applies_under_every_name(tmp_path):
    """A weight shared by two Linears: torch.export lists it under both names and both matmuls
    read the parameter named ``b.weight``; the graph's mask is keyed ``a.weight`` (``b.weight``
    its alias) and still reaches it (without the alias that layer would stay dense: "no
    sparsity mask")."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m = Tied().eval()
    keep = two_of_four((16, 16), 3)
    with torch.no_grad():
        m.a.weight.mul_(torch.from_numpy(keep))
    x = torch.randn(2, 16)
    pg = gp.capture(m, (x,))
    assert "b.weight" in pg.aliases.get("a.weight", ())
    pg.masks["a.weight"] = keep
    art = compiler.compile(m, (x,), out_dir=tmp_path / "t", kernels="csr", graph=pg)
    np.testing.assert_allclose(art(x), m(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert {k: v["sparsity"] for k, v in art.manifest["kernels"].items()
            if k.startswith("sparse:")} == {"sparse:p_b_weight": "csr"}  # fmt: skip


def test_masks_doctest():
    import doctest

    from graphprune.codegen import masks as masks_mod

    result = doctest.testmod(masks_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
