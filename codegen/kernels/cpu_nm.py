"""N:M compressed sparse × dense TensorIR kernel (CPU), for memory-bound (small-batch) Linears.

``YT[N, B] = W[N, K] @ XT[K, B]`` with ``W`` in :class:`~.formats.NMWeight`: ``kept`` values per
row plus their in-group offsets packed ``bits`` per uint32. 2:4 in fp32 moves 4.25 bytes per
kept value instead of 8 dense bytes per group pair: a 1.88× byte bound, so it can only pay where
the layer is memory-bound (batch 1–4; shared/TVM_NOTES.md measured no gain at batch 16).

``B == 1``: one packed word decodes to one vector of column indices (per-lane variable shift,
mask, add the group base, clamp), then one gather of activations and an FMA into a vector
accumulator. ``B > 1``: the CSR batch-vector scheme with the column decoded per kept value.
"""

from __future__ import annotations

from tvm.script import tirx as T

from graphprune.codegen.kernels.cpu_common import KERNEL_ATTRS, plan_batch

__all__ = ["nm_kernel"]


def nm_kernel(n: int, k: int, batch: int, nm: tuple[int, int], kept: int, lanes: int = 16):
    """PrimFunc ``(XT[K,B], values[N,kept], packed[N,kept/per_word], YT[N,B])``;
    ``kept`` is the padded per-row count (``NMWeight.values.shape[1]``)."""
    keep_n, m = (int(v) for v in nm)
    bits = 2 if m <= 4 else 4
    per_word = 32 // bits
    words = kept // per_word
    mask = (1 << bits) - 1
    if batch == 1:
        return _nm_b1(n, k, keep_n, m, bits, per_word, words, kept, mask)
    p = plan_batch(batch, lanes, 4)

    @T.macro
    def chunk(x, values, packed, y, acc, i, base, nacc, width):
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                acc[a * width + l] = T.float32(0)
        for w in range(words):
            for t in T.unroll(per_word):
                col = T.min(
                    ((w * per_word + t) // keep_n) * m
                    + T.Cast("int32", (packed[i, w] >> T.uint32(bits * t)) & T.uint32(mask)),
                    k - 1,
                )
                for a in T.unroll(nacc):
                    for l in T.vectorized(width):
                        acc[a * width + l] = (
                            acc[a * width + l]
                            + values[i, w * per_word + t] * x[col, base + a * width + l]
                        )
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                y[i, base + a * width + l] = acc[a * width + l]

    @T.prim_func
    def nm_spmm(
        x: T.Buffer((k, batch), "float32"),
        values: T.Buffer((n, kept), "float32"),
        packed: T.Buffer((n, words), "uint32"),
        y: T.Buffer((n, batch), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for i in T.parallel(n):
            acc = T.decl_buffer((p.acc * p.lanes,), "float32", scope="local")
            for bo in range(p.full):
                chunk(x, values, packed, y, acc, i, bo * p.full_width, p.acc, p.lanes)
            for bv in range(p.vec):
                chunk(x, values, packed, y, acc, i, p.vec_base + bv * p.lanes, 1, p.lanes)
            if p.tail > 0:
                chunk(x, values, packed, y, acc, i, p.tail_base, 1, p.tail)

    return nm_spmm


def _nm_b1(n, k, keep_n, m, bits, per_word, words, kept, mask):
    # The group base of lane l is (l // keep_n) * m; per_word is a multiple of keep_n, so it
    # splits off the word's base. For power-of-two keep_n a shift keeps it a vector op (a
    # floordiv of a ramp scalarises the whole decode).
    shift = keep_n.bit_length() - 1
    pow2 = keep_n == 1 << shift

    def lane_base(l):
        return ((l >> shift) if pow2 else (l // keep_n)) * m

    @T.prim_func
    def nm_spmv(
        x: T.Buffer((k, 1), "float32"),
        values: T.Buffer((n, kept), "float32"),
        packed: T.Buffer((n, words), "uint32"),
        y: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for i in T.parallel(n):
            acc = T.decl_buffer((per_word,), "float32", scope="local")
            total = T.decl_buffer((1,), "float32", scope="local")
            for l in T.vectorized(per_word):
                acc[l] = T.float32(0)
            for w in range(words):
                for l in T.vectorized(per_word):
                    acc[l] = acc[l] + values[i, w * per_word + l] * x[
                        T.min(
                            (w * per_word // keep_n) * m
                            + lane_base(l)
                            + T.Cast(
                                "int32",
                                (packed[i, w] >> T.Cast("uint32", bits * l)) & T.uint32(mask),
                            ),
                            k - 1,
                        ),
                        0,
                    ]
            total[0] = T.float32(0)
            for l in range(per_word):
                total[0] = total[0] + acc[l]
            y[i, 0] = total[0]

    return nm_spmv
