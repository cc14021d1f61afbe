"""Row-major panel kernels (:mod:`graphprune.codegen.kernels.cpu_panel`): CSR and N:M with
``X[B, K]`` in and ``Y[B, N]`` out, the activation panel transposed in registers inside the
kernel. Oracle: ``x @ W.T`` in float64 on the masked dense weight; and the rewritten Relax model
against the masked torch model.
"""

import numpy as np
import pytest
import torch

from graphprune.codegen.kernels import formats
from graphprune.codegen.kernels.cpu_common import balanced_row_split, simd_lanes
from graphprune.codegen.kernels.cpu_panel import csr_panel_kernel, panel_fits
from graphprune.codegen.kernels.dispatch import build_kernel, make_kernel, run_kernel
from graphprune.codegen.target import make_target

TARGET = make_target("llvm")
pytestmark = pytest.mark.skipif(not panel_fits(16, 16, 16, simd_lanes(TARGET)),
                                reason="the panel kernels need a 16-lane (AVX-512) target")


def masked(rng, n, k, fmt, density=0.1, nm=(2, 4)):
    w = rng.standard_normal((n, k)).astype(np.float32)
    if fmt == "csr":
        return w * (rng.random((n, k)) < density)
    keep_n, m = nm
    order = np.argsort(rng.random((n, k // m, m)), axis=2)
    keep = (order < keep_n) & (rng.random((n, k // m, 1)) < 0.8)  # some groups empty
    return w * keep.reshape(n, k)


def check(w, kern, rng):
    x = rng.standard_normal((kern.batch, w.shape[1])).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(run_kernel(kern, x, TARGET), want, rtol=1e-4,
                               atol=1e-4 * np.sqrt(w.shape[1]))  # fmt: skip


# batch 16 and 64: one batch tile, so the rows are cut in two parts; 32 and 128: two tiles
@pytest.mark.parametrize(("n", "k", "batch"), [(48, 64, 16), (32, 96, 128), (64, 32, 64),
                                               (16, 512, 32)])  # fmt: skip
@pytest.mark.parametrize("fmt", ["csr", "nm"])
def test_panel_matches_dense_numpy(fmt, n, k, batch):
    rng = np.random.default_rng(n * k + batch)
    w = masked(rng, n, k, fmt)
    kern = make_kernel(w, fmt, batch, rows=True)
    assert kern.layout == "rows"
    check(w, kern, rng)


@pytest.mark.parametrize("nm", [(1, 4), (4, 8), (2, 8)])
def test_panel_nm_patterns(nm):
    rng = np.random.default_rng(7)
    w = masked(rng, 32, 64, "nm", nm=nm)
    check(w, make_kernel(w, "nm", 32, nm=nm, rows=True), rng)


def test_panel_empty_and_full_rows():
    rng = np.random.default_rng(3)
    w = masked(rng, 48, 64, "csr", density=0.3)
    w[5:21] = 0  # a whole 16-row block and parts of two more
    w[30] = rng.standard_normal(64)  # a full row
    check(w, make_kernel(w, "csr", 32, rows=True), rng)
    zero = np.zeros((32, 48), np.float32)
    check(zero, make_kernel(zero, "csr", 16, rows=True), rng)


def test_panel_bias_initialises_the_accumulators():
    import tvm

    rng = np.random.default_rng(5)
    w = masked(rng, 32, 48, "csr", density=0.2)
    c = formats.compress_csr(w)
    split = balanced_row_split(c.indptr[::16], 2)
    func = csr_panel_kernel(32, 48, 32, str(c.indices.dtype), parts=2, bias=True)
    mod = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=TARGET)
    x = rng.standard_normal((32, 48)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, c.data, c.indices, c.indptr, split, bias,
                                            np.zeros((32, 32), np.float32))]  # fmt: skip
    mod["k"](*args)
    np.testing.assert_allclose(args[-1].numpy(), x @ w.T + bias, rtol=1e-4, atol=1e-4)


def test_sizes_the_panel_cannot_take_keep_the_transposed_kernel():
    rng = np.random.default_rng(0)
    w = masked(rng, 48, 64, "csr")
    assert make_kernel(w, "csr", 32).layout == "xt"  # the caller did not offer rows
    small = make_kernel(w, "csr", 8, rows=True)  # under 16 rows: the transposed kernels
    assert small.layout == "xt"
    check(w, small, rng)
    ragged = make_kernel(w, "csr", 24, rows=True)  # a last tile of 8 rows (stores guarded)
    assert ragged.layout == "rows"
    check(w, ragged, rng)
    assert make_kernel(masked(rng, 40, 64, "csr"), "csr", 32, rows=True).layout == "xt"
    assert make_kernel(w, "bsr", 32, rows=True).layout == "xt"


def test_one_build_serves_every_density():
    rng = np.random.default_rng(1)
    a = make_kernel(masked(rng, 32, 64, "csr", 0.1), "csr", 32, rows=True)
    b = make_kernel(masked(rng, 32, 64, "csr", 0.6), "csr", 32, rows=True)
    assert a.key == b.key
    assert build_kernel(a, TARGET) is build_kernel(b, TARGET)


@pytest.mark.parametrize("kernels", ["csr", "nm"])
def test_rewrite_calls_the_panel_kernel_without_transposes(kernels):
    """A 3-D Linear input (batch 2 x seq 16 = 32 rows): the rewrite hands the kernel X[B, K]
    and the output is the masked model's."""
    import tvm

    from graphprune.codegen.lower import lower
    from graphprune.codegen.sparse_rewrite import rewrite_sparse
    from test_sparse_rewrite import masked_mlp, run_lowered

    model = masked_mlp("unstructured" if kernels == "csr" else "2:4")
    x = torch.randn(2, 16, 64)
    new, records = rewrite_sparse(lower(model, (x,)), TARGET, kernels, cache_path=False)
    assert [r["layout"] for r in records.values()] == ["rows", "rows"]
    text = new.mod["main"].script()
    assert "permute_dims" not in text
    built, vm = run_lowered(new)
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in built.weights])
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [32, 40, None])
def test_k_chunked_csr_matches_dense_numpy(batch):
    """Dense enough rows (here 60%) over several K-chunks take the L1-blocked kernel; its
    partial sums over the chunks match the float64 product (a ragged and a symbolic batch
    too)."""
    from graphprune.codegen.kernels.cpu_panel import panel_chunk

    rng = np.random.default_rng(11)
    k = 3 * panel_chunk(batch) - 16 * 3  # a partial last chunk
    w = masked(rng, 32, k, "csr", density=0.6)
    w[3] = 0  # an empty row
    kern = make_kernel(w, "csr", batch, rows=True)
    assert kern.key[0] == "csr_chunked" and kern.detail["k_chunks"] == 3
    x = rng.standard_normal((batch or 21, k)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(run_kernel(kern, x, TARGET), want, rtol=1e-4,
                               atol=1e-4 * np.sqrt(k))  # fmt: skip
