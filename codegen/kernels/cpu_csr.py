"""CSR sparse × dense TensorIR kernel for unstructured weights (CPU).

``YT[N, B] = W[N, K] @ XT[K, B]`` with ``W`` in :class:`~.formats.CSRWeight`. Parallel over weight
rows; each row walks its nonzeros once per batch chunk and keeps ``acc`` vector accumulators of
``lanes`` batch columns in registers (one index + one value load amortised over ``acc`` FMAs).
At ``B == 1`` the row's nonzeros are themselves vectorised: ``lanes`` gathered activations per
step into a vector accumulator, a scalar tail, then one horizontal sum.

Written directly as loop-level TIR (no ``sblock``): the nonzero loop has data-dependent bounds,
which the schedule primitives cannot tile, and the loop nest *is* the schedule.
"""

from __future__ import annotations

from tvm.script import tirx as T

from graphprune.codegen.kernels.cpu_common import KERNEL_ATTRS, _nnz_var, plan_batch

__all__ = ["csr_kernel"]


def csr_kernel(n: int, k: int, batch: int, index_dtype: str, lanes: int = 16, nnz=None):
    """PrimFunc ``(XT[K,B], data[nnz], indices[nnz], indptr[N+1], YT[N,B])`` for these sizes."""
    nnz = _nnz_var() if nnz is None else max(nnz, 1)  # zero-length buffers are not allowed
    if batch == 1:
        return _csr_b1(n, k, nnz, index_dtype, lanes)
    p = plan_batch(batch, lanes, 4)

    @T.macro
    def chunk(x, data, indices, indptr, y, acc, i, base, nacc, width):
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                acc[a * width + l] = T.float32(0)
        for j in range(indptr[i], indptr[i + 1]):
            col = T.Cast("int32", indices[j])
            for a in T.unroll(nacc):
                for l in T.vectorized(width):
                    acc[a * width + l] = acc[a * width + l] + data[j] * x[col, base + a * width + l]
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                y[i, base + a * width + l] = acc[a * width + l]

    @T.prim_func
    def csr_spmm(
        x: T.Buffer((k, batch), "float32"),
        data: T.Buffer((nnz,), "float32"),
        indices: T.Buffer((nnz,), index_dtype),
        indptr: T.Buffer((n + 1,), "int32"),
        y: T.Buffer((n, batch), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for i in T.parallel(n):
            acc = T.decl_buffer((p.acc * p.lanes,), "float32", scope="local")
            for bo in range(p.full):
                chunk(x, data, indices, indptr, y, acc, i, bo * p.full_width, p.acc, p.lanes)
            for bv in range(p.vec):
                chunk(x, data, indices, indptr, y, acc, i, p.vec_base + bv * p.lanes, 1, p.lanes)
            if p.tail > 0:
                chunk(x, data, indices, indptr, y, acc, i, p.tail_base, 1, p.tail)

    return csr_spmm


def _csr_b1(n: int, k: int, nnz: int, index_dtype: str, lanes: int):
    @T.prim_func
    def csr_spmv(
        x: T.Buffer((k, 1), "float32"),
        data: T.Buffer((nnz,), "float32"),
        indices: T.Buffer((nnz,), index_dtype),
        indptr: T.Buffer((n + 1,), "int32"),
        y: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for i in T.parallel(n):
            acc = T.decl_buffer((lanes,), "float32", scope="local")
            total = T.decl_buffer((1,), "float32", scope="local")
            start = indptr[i]
            steps = (indptr[i + 1] - start) // lanes
            for l in T.vectorized(lanes):
                acc[l] = T.float32(0)
            for s in range(steps):
                for l in T.vectorized(lanes):
                    # no Let for the index: the vectoriser mis-handles a Let of a ramp here
                    acc[l] = acc[l] + data[start + s * lanes + l] * x[
                        T.Cast("int32", indices[start + s * lanes + l]), 0
                    ]
            total[0] = T.float32(0)
            for l in range(lanes):
                total[0] = total[0] + acc[l]
            for j in range(start + steps * lanes, indptr[i + 1]):
                total[0] = total[0] + data[j] * x[T.Cast("int32", indices[j]), 0]
            y[i, 0] = total[0]

    return csr_spmv
