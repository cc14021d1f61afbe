"""INT8 sparse kernels (CPU, AVX-512 VNNI): ``Y[M, N] = dequant(Xq[M, K] @ Wq[N, K].T) (+ bias)``
with ``Wq`` in a block-sparse format of 1×4 blocks (one output channel × 4 consecutive inputs).

Why 1×4 blocks. ``vpdpbusd`` (what :mod:`.cpu_int8` computes dense with) adds, into each of 16
int32 lanes, the dot product of 4 unsigned bytes with 4 signed bytes. A scalar-nonzero CSR
kernel cannot feed it (the 4 activations of 4 arbitrary columns would need a byte gather per
lane); a block of 4 consecutive columns of one weight row can: the block is one int32 broadcast
to every lane, and with the activations stored *quad-major* (``XT[K/4, M, 4]``: the 4 bytes of
one token's reduction group together, tokens contiguous) one 64-byte load is 16 tokens' quads.
One instruction then does 4 multiply-adds for each of 16 tokens, where the fp32 CSR kernel
(``.cpu_csr``) does 1. The price is the zeros inside kept blocks: at 90% unstructured
sparsity about ``1 - 0.9^4 = 34%`` of the blocks hold a nonzero, so the kernel does ~34% of
the dense VNNI work (``benchmarks/bench_int8_sparse.py`` measures where that pays).

Format (:func:`compress_int8_bsr`): ``data`` int32 ``[nnzb]`` (the block's 4 int8 weights,
little-endian, as one word), ``indices`` int16 ``[nnzb]`` (the block column, ``< 2**15``, so
``K`` up to 131068), ``indptr`` int32 ``[N + 1]``, ``corr`` int32 ``[N]`` = ``128 · Σ_k Wq[n,
k]`` (the zero-point correction: activations are ``Xu = Xq + 128``, as in :mod:`.cpu_int8`).
``int32`` accumulation cannot overflow: ``|Σ| <= K · 255 · 127 < 2**31`` for ``K < 66000``.

Kernels:

* :func:`quads_kernel` turns the dense quantizer's output (``Xu[Mp, Kp]`` uint8,
  :func:`.cpu_int8.quantize_rows_kernel`) and its row scales into ``XT[Kp/4, Mv]`` int32 and the
  scales padded to ``Mv = ceil(M / 16) · 16`` (one vector of tokens per 16);
* :func:`bsr_int8_kernel`: per output row, the row's blocks once per tile of up to ``tv``
  vectors of 16 tokens (``tv`` accumulators, one broadcast weight word, ``tv`` loads and
  ``vpdpbusd`` per block), then the epilogue ``(acc - corr[n]) · s_x[m] · s_w[n] (+ b[n])``
  in registers into a buffer of 16 rows × all tokens, written into ``Y[M, N]`` (the model's
  layout, no transpose op after it) token by token, 16 adjacent values each: storing each
  row's values straight into ``Y`` (one value per cache line, stride ``N``) took 8× the
  whole kernel's time at 768×768, 90% sparse, 128 tokens (1.5 ms vs 0.19 ms, loaded machine).
  Rows are cut into ``chunks`` parallel tasks of equal block counts
  (:func:`~.cpu_common.balanced_row_split`). ``out="int32"`` stores ``Xq @ Wq.T`` exactly.
"""

from __future__ import annotations

import numpy as np
from graphprune.codegen.kernels.cpu_common import (
    ACC_SCOPE,
    PARALLEL_CHUNKS,
    balanced_row_split,
    nnz_var,
)
from graphprune.codegen.kernels.cpu_int8 import INT8_ATTRS, ZERO_POINT, pad_k
from tvm.script import tirx as T

from graphprune.ir.errors import CodegenUnsupported

__all__ = ["Int8BSR", "bsr_int8_kernel", "compress_int8_bsr", "quads_kernel", "token_vectors"]

LANES = 16  # int32 lanes of a zmm register: tokens per vector
TILE_VECTORS = 8  # token vectors per tile (accumulators): 128 tokens, BERT's sequence
ROWS = 16  # output rows computed before they are written out, token by token


def token_vectors(m: int) -> int:
    """``Mv / 16``: vectors of 16 tokens covering ``m`` rows."""
    return -(-m // LANES)


class Int8BSR:
    """``Wq[N, K]`` (int8) in 1×4 blocks; :attr:`arrays` are what :func:`bsr_int8_kernel` takes
    after the activations: ``[data, indices, indptr, split, corr]``.

    Examples
    --------
    >>> w = np.zeros((2, 8), np.int8); w[0, 5] = 3; w[1, :2] = [1, -1]
    >>> b = compress_int8_bsr(w)
    >>> b.indices.tolist(), b.indptr.tolist(), b.corr.tolist(), b.nnzb
    ([1, 0], [0, 1, 2], [384, 0], 2)
    >>> np.array_equal(b.to_dense(), w)
    True
    """

    def __init__(self, shape, data, indices, indptr, corr, chunks):
        self.shape = tuple(int(v) for v in shape)
        self.data, self.indices, self.indptr, self.corr = data, indices, indptr, corr
        self.split = balanced_row_split(indptr, chunks)
        self.chunks = int(chunks)

    @property
    def nnzb(self) -> int:
        return int(self.indices.size)

    @property
    def arrays(self) -> list[np.ndarray]:
        data, indices = self.data, self.indices
        if data.size == 0:  # zero-length buffers are not allowed: one block, read by no row
            data, indices = np.zeros(1, np.int32), np.zeros(1, np.int16)
        return [data, indices, self.indptr, self.split, self.corr]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        out = np.zeros((n, pad_k(k) // 4, 4), np.int8)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        out[rows, self.indices.astype(np.int64)] = self.data.view(np.int8).reshape(-1, 4)
        return out.reshape(n, -1)[:, :k]


def compress_int8_bsr(wq: np.ndarray, chunks: int = PARALLEL_CHUNKS) -> Int8BSR:
    """:class:`Int8BSR` of an int8 ``[N, K]`` matrix, keeping every 1×4 block with a nonzero."""
    wq = np.asarray(wq)
    if wq.dtype != np.int8 or wq.ndim != 2:
        raise CodegenUnsupported(f"int8 BSR takes an int8 [N, K] matrix, got {wq.dtype}{wq.shape}")
    n, k = wq.shape
    kg = pad_k(k) // 4
    if kg > 2**15:
        raise CodegenUnsupported(f"int8 BSR: K={k} has {kg} block columns, over int16 indices")
    full = np.zeros((n, kg * 4), np.int8)
    full[:, :k] = wq
    words = np.ascontiguousarray(full).view(np.int32).reshape(n, kg)
    rows, cols = np.nonzero(words)
    indptr = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    corr = (ZERO_POINT * wq.astype(np.int32).sum(axis=1)).astype(np.int32)
    return Int8BSR((n, k), words[rows, cols].astype(np.int32), cols.astype(np.int16),
                   indptr, corr, min(chunks, max(n, 1)))  # fmt: skip


def quads_kernel(m: int, k: int, mp: int, kp: int):
    """PrimFunc ``(xu[Mp, Kp] uint8, xs[M] float32, xt[Kg, Mv] int32, xsp[Mv] float32)``:
    the quantized activations (as the quantizer of the target's dense path writes them, ``Mp``
    and ``Kp`` its paddings) quad-major with ``Kg = pad_k(K) / 4``, and the row scales padded
    (with 1) to whole vectors of 16 tokens. Padding tokens are the zero point; their outputs
    are never stored."""
    kg, mv = pad_k(k) // 4, token_vectors(m) * LANES

    @T.prim_func(s_tir=True)
    def int8_quads(
        xu: T.Buffer((mp, kp), "uint8"),
        xs: T.Buffer((m,), "float32"),
        xt: T.Buffer((kg, mv), "int32"),
        xsp: T.Buffer((mv,), "float32"),
    ):
        T.func_attr(INT8_ATTRS)
        with T.sblock("root"):
            xw = T.decl_buffer((mp, kp // 4), "int32", data=xu.data)
            for g in T.parallel(kg):
                for i in range(m):
                    xt[g, i] = xw[i, g]
                for i in range(m, mv):
                    xt[g, i] = T.int32(-2139062144)  # 0x80808080: four zero-point bytes
            for i in range(m):
                xsp[i] = xs[i]
            for i in range(m, mv):
                xsp[i] = T.float32(1)

    return int8_quads


def bsr_int8_kernel(m: int, n: int, k: int, nnzb: int | None, chunks: int,
                    out: str = "float32", bias: bool = False, tv: int = TILE_VECTORS):  # fmt: skip
    """PrimFunc for ``Y[M, N]`` from ``xt`` of :func:`quads_kernel` and :class:`Int8BSR`
    (``nnzb=None``: a symbolic block count, one kernel for every layer of the shape).

    Arguments: ``xt[Kp/4, Mv] int32``, ``data[nnzb] int32``, ``indices[nnzb] int16``,
    ``indptr[N+1] int32``, ``split[chunks+1] int32``, ``corr[N] int32``; for ``out="float32"``
    then ``xsp[Mv]`` and ``ws[N]`` (float32) and ``bias[N]`` if ``bias``; last ``y[M, N]``
    (int32 for ``out="int32"``: ``Xq @ Wq.T`` exactly, no epilogue)."""
    if out not in ("int32", "float32"):
        raise CodegenUnsupported(f"int8 BSR kernel output must be int32 or float32, not {out!r}")
    if out == "int32" and bias:
        raise CodegenUnsupported("an int32 int8 kernel has no epilogue (bias)")
    if min(m, n, k) < 1:
        raise CodegenUnsupported(f"int8 BSR kernel for an empty matrix: M={m}, N={n}, K={k}")
    kg = pad_k(k) // 4
    vecs = token_vectors(m)
    mv = vecs * LANES
    tv = max(1, min(tv, vecs))
    nnzb = nnz_var() if nnzb is None else max(int(nnzb), 1)
    is_float = out == "float32"
    ydtype = "float32" if is_float else "int32"

    def ramp(base):
        return T.Ramp(base, 1, LANES)

    def finish(accv, corr, xsp, ws, b, i, base):
        v = accv - T.Broadcast(corr[i], LANES)
        if not is_float:
            return v
        f = T.Cast(f"float32x{LANES}", v) * xsp[ramp(base)] * T.Broadcast(ws[i], LANES)
        return f + T.Broadcast(b[i], LANES) if bias else f

    @T.macro
    def tile(xt, data, indices, indptr, corr, xsp, ws, b, rows, acc, i, r, v0, nv):
        for a in T.unroll(nv):
            acc[ramp(a * LANES)] = T.Broadcast(T.int32(0), LANES)
        for j in range(indptr[i], indptr[i + 1]):
            # the block's 4 signed weights in every lane; 16 tokens' activation quads per load
            wv = T.reinterpret("int8x64", T.Broadcast(data[j], LANES))
            for a in T.unroll(nv):
                acc[ramp(a * LANES)] = T.call_llvm_pure_intrin(
                    "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[ramp(a * LANES)],
                    T.reinterpret("int8x64", xt[T.Cast("int32", indices[j]),
                                                ramp((v0 + a) * LANES)]), wv,
                )  # fmt: skip
        for a in T.unroll(nv):
            rows[ramp(r * mv + (v0 + a) * LANES)] = finish(acc[ramp(a * LANES)], corr, xsp, ws,
                                                           b, i, (v0 + a) * LANES)  # fmt: skip

    @T.macro
    def body(xt, data, indices, indptr, split, corr, xsp, ws, b, y):
        for t in T.parallel(chunks):
            acc = T.decl_buffer((tv * LANES,), "int32", scope=ACC_SCOPE)
            # ROWS output rows x all tokens, written out token by token: ROWS adjacent values
            # of Y per token, where one row at a time stored one value per cache line of Y
            # (stride N) and cost more than the whole block loop at BERT's shapes
            rows = T.decl_buffer((ROWS * mv,), ydtype, scope=ACC_SCOPE)
            first: T.let = split[t]
            count: T.let = split[t + 1] - split[t]
            # rows as an offset from a bound start (see cpu_csr: a range over split[t]..
            # computed later chunks from chunk 0's rows in this TVM)
            for g in range((count + ROWS - 1) // ROWS):
                for r in range(T.min(ROWS, count - g * ROWS)):
                    for vt in range(vecs // tv):
                        tile(xt, data, indices, indptr, corr, xsp, ws, b, rows, acc,
                             first + g * ROWS + r, r, vt * tv, tv)  # fmt: skip
                    if vecs % tv > 0:
                        tile(xt, data, indices, indptr, corr, xsp, ws, b, rows, acc,
                             first + g * ROWS + r, r, vecs // tv * tv, vecs % tv)  # fmt: skip
                for mm in range(m):
                    for r in range(T.min(ROWS, count - g * ROWS)):
                        y[mm, first + g * ROWS + r] = rows[r * mv + mm]

    if not is_float:

        @T.prim_func
        def bsr_int8_i32(
            xt: T.Buffer((kg, mv), "int32"),
            data: T.Buffer((nnzb,), "int32"),
            indices: T.Buffer((nnzb,), "int16"),
            indptr: T.Buffer((n + 1,), "int32"),
            split: T.Buffer((chunks + 1,), "int32"),
            corr: T.Buffer((n,), "int32"),
            y: T.Buffer((m, n), "int32"),
        ):
            T.func_attr(INT8_ATTRS)
            body(xt, data, indices, indptr, split, corr, corr, corr, corr, y)

        return bsr_int8_i32

    if bias:

        @T.prim_func
        def bsr_int8_bias(
            xt: T.Buffer((kg, mv), "int32"),
            data: T.Buffer((nnzb,), "int32"),
            indices: T.Buffer((nnzb,), "int16"),
            indptr: T.Buffer((n + 1,), "int32"),
            split: T.Buffer((chunks + 1,), "int32"),
            corr: T.Buffer((n,), "int32"),
            xsp: T.Buffer((mv,), "float32"),
            ws: T.Buffer((n,), "float32"),
            b: T.Buffer((n,), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr(INT8_ATTRS)
            body(xt, data, indices, indptr, split, corr, xsp, ws, b, y)

        return bsr_int8_bias

    @T.prim_func
    def bsr_int8(
        xt: T.Buffer((kg, mv), "int32"),
        data: T.Buffer((nnzb,), "int32"),
        indices: T.Buffer((nnzb,), "int16"),
        indptr: T.Buffer((n + 1,), "int32"),
        split: T.Buffer((chunks + 1,), "int32"),
        corr: T.Buffer((n,), "int32"),
        xsp: T.Buffer((mv,), "float32"),
        ws: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(INT8_ATTRS)
        body(xt, data, indices, indptr, split, corr, xsp, ws, ws, y)

    return bsr_int8
