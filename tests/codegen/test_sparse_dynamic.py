"""Sparse kernels in dynamic-shape artifacts (issue 14): the row-major panel kernels take a
symbolic batch, so ``compile(kernels=..., dynamic_shapes=...)`` keeps the sparse layers sparse.
Oracle: the masked torch model at several shapes, one artifact."""

import numpy as np
import pytest
import torch
from codegen_helpers import assert_matches, sparse_records, torch_outputs
from test_sparse_rewrite import masked_mlp

from graphprune import codegen
from graphprune.codegen.kernels.cpu_common import simd_lanes
from graphprune.codegen.kernels.cpu_panel import panel_fits
from graphprune.codegen.target import make_target
from graphprune.models.hf import hf_bert_tiny

Dim = torch.export.Dim
pytestmark = pytest.mark.skipif(not panel_fits(16, 16, None, simd_lanes(make_target("llvm"))),
                                reason="the panel kernels need a 16-lane (AVX-512) target")


@pytest.mark.parametrize(("kernels", "pattern"), [("csr", "unstructured"), ("nm", "2:4"),
                                                  ("auto", "unstructured")])  # fmt: skip
def test_dynamic_mlp_with_sparse_layers_matches_torch(kernels, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_KERNEL_CACHE", str(tmp_path / "cache.json"))
    model = masked_mlp(pattern)
    dyn = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=64)},)
    art = codegen.compile(model, (torch.randn(2, 16, 64),), out_dir=tmp_path / "a",
                          kernels=kernels, dynamic_shapes=dyn)  # fmt: skip
    recs = sparse_records(art)
    if kernels != "auto":  # auto may keep a layer dense, by measurement
        assert [r["sparsity"] for r in recs.values()] == [kernels, kernels]
    assert all(r["batch"].startswith("dynamic") for r in recs.values())
    assert all(r["layout"] == "rows" for r in recs.values() if r["sparsity"] != "dense")
    for b, s in ((2, 16), (3, 5), (1, 1), (8, 64)):  # 5 and 15 rows: ragged panel tiles
        x = torch.randn(b, s, 64, generator=torch.Generator().manual_seed(b * s))
        assert_matches(art(x), torch_outputs(model, (x,)))


def test_dynamic_bert_with_sparse_layers_matches_torch_at_two_shapes(tmp_path):
    model, inputs = hf_bert_tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_((torch.rand(mod.weight.shape, generator=g) < 0.2).float())
    batch, seq = Dim("batch", min=1, max=4), Dim("seq", min=2, max=64)
    art = codegen.compile(model, inputs, out_dir=tmp_path / "bert", kernels="csr",
                          dynamic_shapes={"inputs": ({0: batch, 1: seq}, {0: batch, 1: seq})})  # fmt: skip
    kinds = [r["sparsity"] for r in sparse_records(art).values()]
    assert kinds.count("csr") >= 6, kinds
    for b, s in ((1, 7), (3, 33)):
        ids = torch.randint(0, 128, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.int64)
        mask[0, s // 2 :] = 0
        assert_matches(art(ids, mask), torch_outputs(model, (ids, mask)))


def test_dynamic_layer_no_panel_kernel_takes_stays_dense_with_the_reason(tmp_path):
    model = torch.nn.Linear(24, 8).eval()  # sizes not multiples of 16
    with torch.no_grad():
        model.weight.mul_((torch.rand(8, 24) < 0.2).float())
    art = codegen.compile(model, (torch.randn(2, 24),), out_dir=tmp_path / "a", kernels="csr",
                          dynamic_shapes=({0: Dim("batch", min=1, max=8)},))  # fmt: skip
    (rec,) = sparse_records(art).values()
    assert rec["sparsity"] == "dense" and "symbolic batch" in rec["reason"]
    x = torch.randn(5, 24)
    np.testing.assert_allclose(art(x), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
