"""The INT8 sparse kernel (codegen/kernels/cpu_int8_sparse.py: 1×4 blocks, VNNI) against numpy.

* the format round-trips (``to_dense``) and keeps exactly the 1×4 blocks holding a nonzero;
* int32 output equals ``Xq @ Wq.T`` computed by numpy in int32, **exactly**, with the
  activations passed through the quad-major transposition kernel from the dense quantizer's
  layout (AMX's row/K padding included), on shapes where ``M`` is not a multiple of 16 (the
  token vector), ``K`` not of 4 (the block), rows are empty, and at the extreme products
  (±127·±127, where a saturating instruction would be wrong);
* float output: dequantize + bias against the same products in float64; the kernel computes
  ``float32(acc) · s_x · s_w + b`` (3 roundings of a float32 operation, and ``acc`` below
  2**24 converts exactly here), so ``rtol 1e-6`` of the magnitude bounds it.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from graphprune.codegen.kernels.cpu_int8 import int8_isa, pad_k, pad_m
from graphprune.codegen.kernels.cpu_int8_sparse import (
    bsr_int8_kernel,
    compress_int8_bsr,
    quads_kernel,
    token_vectors,
)
from graphprune.codegen.target import make_target

from graphprune.ir.errors import CodegenUnsupported

HOST = make_target("llvm")
pytestmark = pytest.mark.skipif(int8_isa(HOST) not in ("amx", "vnni"),
                                reason="host CPU has no AVX-512 VNNI")  # fmt: skip
SHAPES = [(5, 37, 13, 0.3), (19, 129, 258, 0.05), (33, 7, 9, 1.0), (16, 20, 64, 0.0)]


def _build(func):
    return tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=HOST)


def _call(lib, *arrays):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    lib["f"](*args)
    return [a.numpy() for a in args]


def _quads(xq: np.ndarray, xs: np.ndarray, isa: str):
    """``(xt, xsp)`` from signed activations, through the dense quantizer's layout for ``isa``."""
    m, k = xq.shape
    mp, kp = pad_m(m, isa), pad_k(k, isa)
    xu = np.full((mp, kp), 128, np.uint8)
    xu[:m, :k] = (xq.astype(np.int32) + 128).astype(np.uint8)
    mv = token_vectors(m) * 16
    out = _call(_build(quads_kernel(m, k, mp, kp)), xu, xs, np.zeros((pad_k(k) // 4, mv), np.int32),
                np.zeros(mv, np.float32))  # fmt: skip
    return out[2], out[3]


def _sparse_int8(rng, shape, density):
    w = rng.integers(-127, 128, shape) * (rng.random(shape) < density)
    return w.astype(np.int8)


def test_format_keeps_the_nonzero_blocks_and_round_trips():
    rng = np.random.default_rng(0)
    wq = _sparse_int8(rng, (23, 50), 0.1)
    wq[3] = 0  # an empty row
    b = compress_int8_bsr(wq)
    np.testing.assert_array_equal(b.to_dense(), wq)
    padded = np.zeros((23, 52), np.int8)
    padded[:, :50] = wq
    assert b.nnzb == int(np.count_nonzero(padded.reshape(23, 13, 4).any(axis=2)))
    assert b.indptr[4] == b.indptr[3]
    assert b.indices.dtype == np.int16 and b.data.dtype == np.int32
    np.testing.assert_array_equal(b.corr, 128 * wq.astype(np.int32).sum(1))


@pytest.mark.parametrize("m,n,k,density,isa", [(*s, "vnni") for s in SHAPES]
                         + [(*SHAPES[1], "amx")])  # AMX's quantizer pads rows to 32, K to 64
def test_int32_equals_numpy_exactly(m, n, k, density, isa):
    rng = np.random.default_rng(m * 100 + n + k)
    xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
    wq = _sparse_int8(rng, (n, k), density)
    b = compress_int8_bsr(wq)
    xt, _ = _quads(xq, np.ones(m, np.float32), isa)
    got = _call(_build(bsr_int8_kernel(m, n, k, b.nnzb, b.chunks, out="int32")), xt, *b.arrays,
                np.zeros((m, n), np.int32))[-1]  # fmt: skip
    np.testing.assert_array_equal(got, xq.astype(np.int32) @ wq.astype(np.int32).T)


def test_extreme_products_are_exact():
    m, n, k = 17, 5, 40
    xq = np.full((m, k), 127, np.int8)
    xq[1::2] = -127
    wq = np.full((n, k), -127, np.int8)
    wq[:, ::3] = 0
    b = compress_int8_bsr(wq)
    xt, _ = _quads(xq, np.ones(m, np.float32), "vnni")
    got = _call(_build(bsr_int8_kernel(m, n, k, b.nnzb, b.chunks, out="int32")), xt, *b.arrays,
                np.zeros((m, n), np.int32))[-1]  # fmt: skip
    np.testing.assert_array_equal(got, xq.astype(np.int32) @ wq.astype(np.int32).T)


@pytest.mark.parametrize("bias", [False, True])
def test_float_epilogue_is_the_dequantized_product(bias):
    rng = np.random.default_rng(11)
    m, n, k = 21, 45, 70
    xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
    wq = _sparse_int8(rng, (n, k), 0.2)
    xs = rng.uniform(0.001, 0.1, m).astype(np.float32)
    ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
    bv = rng.standard_normal(n).astype(np.float32)
    b = compress_int8_bsr(wq)
    xt, xsp = _quads(xq, xs, "vnni")
    assert np.all(xsp[m:] == 1) and np.array_equal(xsp[:m], xs)
    extra = [bv] if bias else []
    got = _call(_build(bsr_int8_kernel(m, n, k, b.nnzb, b.chunks, bias=bias)), xt, *b.arrays,
                xsp, ws, *extra, np.zeros((m, n), np.float32))[-1]  # fmt: skip
    acc = (xq.astype(np.int64) @ wq.astype(np.int64).T).astype(np.float64)
    want = acc * xs[:, None] * ws[None, :] + (bv if bias else 0)
    scale = np.abs(acc) * xs[:, None] * ws[None, :] + (np.abs(bv) if bias else 0)
    assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30)


def test_bad_arguments_are_refused():
    with pytest.raises(CodegenUnsupported, match="int8 \\[N, K\\]"):
        compress_int8_bsr(np.zeros((3, 4), np.float32))
    with pytest.raises(CodegenUnsupported, match="no epilogue"):
        bsr_int8_kernel(4, 4, 4, 1, 1, out="int32", bias=True)
