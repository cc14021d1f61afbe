"""BSR sparse × dense TensorIR kernel for ``block:RxC`` masks (CPU).

``YT[N, B] = W[N, K] @ XT[K, B]`` with ``W`` in :class:`~.formats.BSRWeight` (blocks stored
``[C, R]``). Parallel over 16 equal runs of block rows. Each nonzero block is a dense
register-blocked micro-tile: for ``B > 1`` an ``R × (acc·lanes)`` accumulator tile
(``R·acc ≤ 16`` vector registers, half the AVX-512 file) takes one broadcast weight per row
against a vector of batch columns; for
``B == 1`` the block's ``R`` rows are the vector (``16x1`` blocks fill a zmm register) and
``C`` contiguous activations are broadcast. Edges: ``K % C`` guards the activation loads,
``N % R`` the stores (only emitted when the sizes need them).
"""

from __future__ import annotations

from tvm.script import tirx as T

from graphprune.codegen.kernels.cpu_common import (
    ACC_SCOPE,
    KERNEL_ATTRS,
    batch_tiles,
    even_chunks,
    nnz_var,
    plan_batch,
)

__all__ = ["bsr_kernel"]


def _col(indices, j, c, cc):
    """Input column of column ``cc`` of block ``j`` (an expression: an assignment in TVMScript
    would be a "local" buffer, allocated from the heap workspace)."""
    return T.Cast("int32", indices[j]) * c + cc


def bsr_kernel(n: int, k: int, batch: int, block: tuple[int, int], index_dtype: str,
               lanes: int = 16):  # fmt: skip
    """PrimFunc ``(XT[K,B], data[nnzb,C,R], indices[nnzb], indptr[NBR+1], YT[N,B])``."""
    r, c = (int(v) for v in block)
    nbr = -(-n // r)
    nnzb = nnz_var()
    k_edge = k % c != 0
    n_edge = n % r != 0
    chunks, rows = even_chunks(nbr)
    if batch == 1:
        return _bsr_b1(n, k, r, c, nbr, nnzb, index_dtype, k_edge, n_edge, chunks, rows)
    p = plan_batch(batch, lanes, max(1, min(4, 16 // r)))

    @T.macro
    def tile(x, data, indices, indptr, y, acc, ib, base, nacc, width):
        for rr in T.unroll(r):
            for a in T.unroll(nacc):
                for l in T.vectorized(width):
                    acc[(rr * nacc + a) * width + l] = T.float32(0)
        for j in range(indptr[ib], indptr[ib + 1]):
            for cc in T.unroll(c):
                for rr in T.unroll(r):
                    for a in T.unroll(nacc):
                        for l in T.vectorized(width):
                            if k_edge:
                                acc[(rr * nacc + a) * width + l] = acc[
                                    (rr * nacc + a) * width + l
                                ] + data[j, cc, rr] * T.if_then_else(
                                    _col(indices, j, c, cc) < k,
                                    x[T.min(_col(indices, j, c, cc), k - 1), base + a * width + l],
                                    T.float32(0),
                                )  # fmt: skip
                            else:
                                acc[(rr * nacc + a) * width + l] = (
                                    acc[(rr * nacc + a) * width + l]
                                    + data[j, cc, rr]
                                    * x[_col(indices, j, c, cc), base + a * width + l]
                                )
        for rr in range(r):
            if not n_edge or ib * r + rr < n:
                for a in T.unroll(nacc):
                    for l in T.vectorized(width):
                        y[ib * r + rr, base + a * width + l] = acc[(rr * nacc + a) * width + l]

    tiles = batch_tiles(p, tile)

    @T.prim_func
    def bsr_spmm(
        x: T.Buffer((k, batch), "float32"),
        data: T.Buffer((nnzb, c, r), "float32"),
        indices: T.Buffer((nnzb,), index_dtype),
        indptr: T.Buffer((nbr + 1,), "int32"),
        y: T.Buffer((n, batch), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for t in T.parallel(chunks):
            acc = T.decl_buffer((r * p.acc * p.lanes,), "float32", scope=ACC_SCOPE)
            for rb in range(T.min(rows, nbr - t * rows)):
                ib: T.let = t * rows + rb
                tiles(x, data, indices, indptr, y, acc, ib)

    return bsr_spmm


def _bsr_b1(n, k, r, c, nbr, nnzb, index_dtype, k_edge, n_edge, chunks, rows):
    @T.prim_func
    def bsr_spmv(
        x: T.Buffer((k, 1), "float32"),
        data: T.Buffer((nnzb, c, r), "float32"),
        indices: T.Buffer((nnzb,), index_dtype),
        indptr: T.Buffer((nbr + 1,), "int32"),
        y: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for t in T.parallel(chunks):
            acc = T.decl_buffer((r,), "float32", scope=ACC_SCOPE)
            for rb in range(T.min(rows, nbr - t * rows)):
                ib: T.let = t * rows + rb
                for rr in T.vectorized(r):
                    acc[rr] = T.float32(0)
                for j in range(indptr[ib], indptr[ib + 1]):
                    for cc in T.unroll(c):
                        for rr in T.vectorized(r):
                            if k_edge:
                                acc[rr] = acc[rr] + data[j, cc, rr] * T.if_then_else(
                                    _col(indices, j, c, cc) < k,
                                    x[T.min(_col(indices, j, c, cc), k - 1), 0],
                                    T.float32(0),
                                )
                            else:
                                acc[rr] = acc[rr] + data[j, cc, rr] * x[_col(indices, j, c, cc), 0]
                for rr in range(r):
                    if not n_edge or ib * r + rr < n:
                        y[ib * r + rr, 0] = acc[rr]

    return bsr_spmv
