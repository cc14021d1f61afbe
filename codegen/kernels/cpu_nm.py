"""N:M compressed sparse × dense TensorIR kernel (CPU), for memory-bound (small-batch) Linears.

``YT[N, B] = W[N, K] @ XT[K, B]`` with ``W`` in :class:`~.formats.NMWeight`: ``kept`` values per
row plus their in-group offsets packed ``bits`` per uint32. 2:4 in fp32 moves 4.25 bytes per
kept value instead of 8 dense bytes per group pair: a 1.88× byte bound, so it can only pay where
the layer is memory-bound (batch 1–4; shared/TVM_NOTES.md measured no gain at batch 16).

``B == 1``, AVX-512, 50%-dense patterns (2:4, 4:8, 1:2, 8:16): a vector of 16 kept values covers
a window of 32 consecutive activations. The packed offsets decode to 16 window-local column
numbers in three vector ops (broadcast the word, per-lane ``vpsrlvd``, mask + lane base) and
``vpermi2ps`` picks the 16 activations out of the window's two registers: no gather, about six
instructions per 16 values, so the kernel streams ``values`` at memory speed. Windows that would
read past ``K`` and the zero padding of ``kept`` go through a scalar decode.
In cache it takes about 2.7 cycles per 16 values (4096-wide rows resident in L2, one thread,
Zen 5: ~110 GB/s): the decode and the two-source permute bound it, not loads. Sharing each
activation window between 2 or 4 rows (one pair of ``x`` loads for several rows) measured no
faster (4096², 2:4, one thread: 0.85-1.02 ms against 0.89), so rows stay one at a time.

``B == 1`` otherwise: the packed word decodes to a vector of clamped column indices and the
activations are element loads. ``B > 1``: the CSR batch-vector scheme with the column decoded per
kept value. Rows are cut into :data:`~.cpu_common.PARALLEL_CHUNKS` equal parallel tasks.
"""

from __future__ import annotations

from tvm.script import tirx as T

from graphprune.codegen.kernels.cpu_common import (
    ACC_SCOPE,
    KERNEL_ATTRS,
    batch_tiles,
    even_chunks,
    plan_batch,
)

__all__ = ["nm_kernel"]


def nm_kernel(n: int, k: int, batch: int, nm: tuple[int, int], kept: int, lanes: int = 16):
    """PrimFunc ``(XT[K,B], values[N,kept], packed[N,kept/per_word], YT[N,B])``;
    ``kept`` is the padded per-row count (``NMWeight.values.shape[1]``)."""
    keep_n, m = (int(v) for v in nm)
    bits = 2 if m <= 4 else 4
    per_word = 32 // bits
    words = kept // per_word
    mask = (1 << bits) - 1
    chunks, rows = even_chunks(n)
    if batch == 1:
        pow2 = keep_n & (keep_n - 1) == 0
        if lanes == 16 and pow2 and 16 % keep_n == 0 and 16 // keep_n * m <= 32:
            return _nm_b1_permute(n, k, keep_n, m, bits, per_word, words, kept, mask)
        return _nm_b1(n, k, keep_n, m, bits, per_word, words, kept, mask)
    p = plan_batch(batch, lanes, 4)

    @T.macro
    def chunk(x, values, packed, y, acc, i, base, nacc, width):
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                acc[a * width + l] = T.float32(0)
        for w in range(words):
            for t in T.unroll(per_word):
                for a in T.unroll(nacc):
                    for l in T.vectorized(width):
                        acc[a * width + l] = acc[a * width + l] + values[
                            i, w * per_word + t
                        ] * x[_scalar_col(packed, i, w * per_word + t, keep_n, m, bits, per_word,
                                          mask, k), base + a * width + l]  # fmt: skip
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                y[i, base + a * width + l] = acc[a * width + l]

    tiles = batch_tiles(p, chunk)

    @T.prim_func
    def nm_spmm(
        x: T.Buffer((k, batch), "float32"),
        values: T.Buffer((n, kept), "float32"),
        packed: T.Buffer((n, words), "uint32"),
        y: T.Buffer((n, batch), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for c in T.parallel(chunks):
            acc = T.decl_buffer((p.acc * p.lanes,), "float32", scope=ACC_SCOPE)
            for r in range(T.min(rows, n - c * rows)):
                i: T.let = c * rows + r
                tiles(x, values, packed, y, acc, i)

    return nm_spmm


def _scalar_col(packed, i, t, keep_n, m, bits, per_word, mask, k):
    """Column of kept entry ``t`` of row ``i``, clamped into ``K`` (padding has value 0)."""
    off = (packed[i, t // per_word] >> T.Cast("uint32", bits * (t % per_word))) & T.uint32(mask)
    return T.min((t // keep_n) * m + T.Cast("int32", off), k - 1)


def _nm_b1_permute(n, k, keep_n, m, bits, per_word, words, kept, mask):
    shift = keep_n.bit_length() - 1
    window = 16 // keep_n * m  # activations one vector of kept values spans (<= 32)
    nvec = min(kept // 16, k // window)  # vectors whose window lies inside K
    unroll = 2
    lane = T.Ramp(0, 1, 16)
    # lane l sits in group l // keep_n of the window, which starts at column (l // keep_n) * m
    lane_base = (lane >> T.Broadcast(shift, 16)) * T.Broadcast(m, 16)
    if bits == 2:  # one word per vector: lane l at bits 2l
        shifts = T.Ramp(T.uint32(0), T.uint32(2), 16)
    else:  # two words per vector: lane l in word l // 8 at bits 4 (l % 8)
        shifts = T.Cast("uint32x16", (lane & T.Broadcast(7, 16)) * T.Broadcast(4, 16))

    def words_of(packed, i, v):
        if bits == 2:
            return T.Broadcast(packed[i, v], 16)
        return T.Select(lane < T.Broadcast(8, 16), T.Broadcast(packed[i, 2 * v], 16),
                        T.Broadcast(packed[i, 2 * v + 1], 16))  # fmt: skip

    def picked(xf, packed, i, v):
        offs = (words_of(packed, i, v) >> shifts) & T.Broadcast(T.uint32(mask), 16)
        local = T.Cast("int32x16", offs) + lane_base
        lo = xf[T.Ramp(v * window, 1, 16)]
        if window <= 16:
            return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512",
                                           lo, local)  # fmt: skip
        hi = xf[T.Ramp(v * window + 16, 1, 16)]
        return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermi2var.ps.512",
                                       lo, local, hi)  # fmt: skip

    @T.macro
    def fma(acc, a, xf, values, packed, i, v):
        acc[T.Ramp(a * 16, 1, 16)] = acc[T.Ramp(a * 16, 1, 16)] + values[
            i, T.Ramp(v * 16, 1, 16)
        ] * picked(xf, packed, i, v)

    @T.macro
    def row(acc, total, xf, values, packed, i):
        for l in T.vectorized(unroll * 16):
            acc[l] = T.float32(0)
        for s in range(nvec // unroll):
            for a in T.unroll(unroll):
                fma(acc, a, xf, values, packed, i, s * unroll + a)
        for v in range(nvec // unroll * unroll, nvec):
            fma(acc, 0, xf, values, packed, i, v)
        # tree sum (unroll == 2: 32 -> 16 -> 8 -> 4 -> 2 -> 1), 5 dependent adds per row
        # where a chain over the lanes was 32: at ~400 cycles of streaming per row that
        # chain was not hidden
        for l in T.vectorized(16):
            acc[l] = acc[l] + acc[16 + l]
        for l in T.vectorized(8):
            acc[l] = acc[l] + acc[8 + l]
        for l in T.vectorized(4):
            acc[l] = acc[l] + acc[4 + l]
        for l in T.vectorized(2):
            acc[l] = acc[l] + acc[2 + l]
        total[0] = acc[0] + acc[1]
        for t in range(nvec * 16, kept):
            total[0] = total[0] + values[i, t] * xf[
                _scalar_col(packed, i, t, keep_n, m, bits, per_word, mask, k)
            ]

    return _spmv_rows(n, k, kept, words, unroll * 16, row)


def _nm_b1(n, k, keep_n, m, bits, per_word, words, kept, mask):
    # The group base of lane l is (l // keep_n) * m; per_word is a multiple of keep_n, so it
    # splits off the word's base. For power-of-two keep_n a shift keeps it a vector op (a
    # floordiv of a ramp scalarises the whole decode).
    shift = keep_n.bit_length() - 1
    pow2 = keep_n == 1 << shift

    def lane_base(l):
        return ((l >> shift) if pow2 else (l // keep_n)) * m

    @T.macro
    def row(acc, total, xf, values, packed, i):
        for l in T.vectorized(per_word):
            acc[l] = T.float32(0)
        for w in range(words):
            for l in T.vectorized(per_word):
                acc[l] = acc[l] + values[i, w * per_word + l] * xf[
                    T.min(
                        (w * per_word // keep_n) * m
                        + lane_base(l)
                        + T.Cast("int32", (packed[i, w] >> T.Cast("uint32", bits * l))
                                 & T.uint32(mask)),
                        k - 1,
                    )
                ]  # fmt: skip
        total[0] = T.float32(0)
        for l in range(per_word):
            total[0] = total[0] + acc[l]

    return _spmv_rows(n, k, kept, words, per_word, row)


def _spmv_rows(n, k, kept, words, acc_width, row):
    """The batch-1 kernels' frame: rows in equal parallel tasks, each task's register
    accumulators (``acc_width`` lanes and a scalar ``total``) handed to the macro
    ``row(acc, total, xf, values, packed, i)``, which leaves row ``i``'s result in ``total``."""
    chunks, rows = even_chunks(n)

    @T.prim_func
    def nm_spmv(
        x: T.Buffer((k, 1), "float32"),
        values: T.Buffer((n, kept), "float32"),
        packed: T.Buffer((n, words), "uint32"),
        y: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        xf = T.decl_buffer((k,), "float32", data=x.data)
        for c in T.parallel(chunks):
            acc = T.decl_buffer((acc_width,), "float32", scope=ACC_SCOPE)
            total = T.decl_buffer((1,), "float32", scope=ACC_SCOPE)
            for r in range(T.min(rows, n - c * rows)):
                i: T.let = c * rows + r
                row(acc, total, xf, values, packed, i)
                y[i, 0] = total[0]

    return nm_spmv
