"""Row-major sparse Linear kernels (CPU, AVX-512): ``Y[B, N] = X[B, K] @ W.T`` with the
activation panel packed inside the kernel, so the layer needs no transposes around it.

The batch-vector scheme of :mod:`.cpu_csr` wants the activation transposed (``XT[K, B]``: one
weight value broadcast against a vector of batch columns). Done as separate Relax
``permute_dims`` around the call, the two transposes of a BERT-base-quick layer (128 × 256)
took 25-34 µs each against 20 µs for the 90%-sparse product itself, and the dense layer won.
Here each parallel task takes ``W = 16·acc`` batch rows of ``X``, transposes them 16 × 16 at a
time in registers (four rounds of two-source shuffles, 64 shuffles per 256 floats, about 0.3
cycles per element: 4 µs for the same 128 × 256) into a ``[K, W]`` panel that stays in cache,
runs every weight row of its share against the panel (``acc`` vector accumulators, one index
and one value load per ``acc`` FMAs), and transposes each group of 16 finished rows back into
``Y``'s rows with the same shuffles. ``bias`` (optional) initialises the accumulators, so the
bias add is not a separate pass over ``Y``.

Parallel tasks: batch tiles × ``parts`` runs of 16-row blocks with equal nonzero counts
(``split``, from :func:`~.cpu_common.balanced_row_split` on the block row pointer). Each task
packs its own panel, so ``parts > 1`` (only when there are fewer tiles than threads) repeats
the packing once per part.

Tried and dropped (90% CSR, batch 128, one thread, interleaved best-of, loaded machine): 8
accumulators (a 128-wide panel) 10-20% slower than 4; even and odd nonzeros into two accumulator
sets (to hide the FMA latency) 2-6% slower: the loop is not latency-bound.

Any ``B`` of at least 16, or a symbolic ``B`` (dynamic-shape artifacts): a last tile that ``B``
does not fill packs copies of the last row and stores only the rows that exist. ``N`` and ``K``
multiples of 16 and a 16-lane (AVX-512) target (else the rewrite keeps the transposed kernels,
static shapes only).
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from graphprune.codegen.kernels.cpu_common import ACC_SCOPE, KERNEL_ATTRS, nnz_var

__all__ = ["panel_fits", "panel_acc", "csr_panel_kernel", "nm_panel_kernel"]

_V = 16  # lanes; the 16 x 16 transpose below is written for 512-bit vectors


def panel_fits(n: int, k: int, batch, lanes: int) -> bool:
    """Whether the row-major panel kernels take this layer: ``batch`` is an int (at least 16;
    smaller batches are the matrix-vector kernels' business) or ``None`` for a symbolic batch."""
    sizes = lanes == _V and n % _V == 0 and k % _V == 0
    return sizes and (batch is None or batch >= _V)


def panel_acc(batch) -> int:
    """Vector accumulators per row (the panel is ``16·acc`` batch rows wide): the widest that
    divides ``batch``, else (a ragged last tile) 4, or fewer for a batch under 64."""
    if not isinstance(batch, int):
        return 4
    even = [a for a in (4, 2, 1) if batch % (_V * a) == 0]
    return even[0] if even else max(1, min(4, batch // _V))


def _masks(bit: int) -> tuple[list[int], list[int]]:
    """Shuffle masks of one transpose round: swap bit ``bit`` of the row and lane numbers.

    Rows ``a`` (bit clear) and ``b = a | bit`` become ``a'[c] = a[c]`` or ``b[c ^ bit]`` and
    ``b'[c] = a[c | bit]`` or ``b[c]``, by whether lane ``c`` has the bit (indices of the
    concatenation ``a ++ b``)."""
    lo = [c if not c & bit else _V + (c ^ bit) for c in range(_V)]
    hi = [c | bit if not c & bit else _V + c for c in range(_V)]
    return lo, hi


_MASKS = [_masks(1 << b) for b in range(4)]


def _vec(buf, base):
    return buf[T.Ramp(base, 1, _V)]


@T.macro
def _round(tr, src, dst, shift, lo, hi):
    for p in T.unroll(_V // 2):
        a: T.let = ((p >> shift) << (shift + 1)) | (p & ((1 << shift) - 1))
        b: T.let = a + (1 << shift)
        tr[T.Ramp(dst * 256 + a * _V, 1, _V)] = T.Shuffle(
            [_vec(tr, src * 256 + a * _V), _vec(tr, src * 256 + b * _V)], lo
        )
        tr[T.Ramp(dst * 256 + b * _V, 1, _V)] = T.Shuffle(
            [_vec(tr, src * 256 + a * _V), _vec(tr, src * 256 + b * _V)], hi
        )


@T.macro
def _transpose(tr):
    """Transpose the 16 × 16 block in ``tr[0:256]`` in place (``tr[256:512]`` is scratch);
    every index is a constant once unrolled, so LLVM keeps ``tr`` in registers."""
    _round(tr, 0, 1, 0, _MASKS[0][0], _MASKS[0][1])
    _round(tr, 1, 0, 1, _MASKS[1][0], _MASKS[1][1])
    _round(tr, 0, 1, 2, _MASKS[2][0], _MASKS[2][1])
    _round(tr, 1, 0, 3, _MASKS[3][0], _MASKS[3][1])


def _frame(n, k, batch, acc, parts, row_dot, weight_args, has_bias):
    """The panel kernel around ``row_dot(accs, panel, i, w0, w1, w2)`` (a macro that adds row
    ``i`` of ``W`` times the panel into the ``acc`` vectors ``accs``)."""
    width = _V * acc
    if batch is None:  # one kernel for every batch: Relax binds the extent at the call
        from tvm import tirx

        batch = tirx.Var("batch", "int64")
    ragged = not isinstance(batch, int) or batch % width != 0
    tiles = (batch + width - 1) // width

    def src_row(row):  # a ragged last tile packs copies of the last row, never stored
        return T.min(row, batch - 1) if ragged else row

    @T.macro
    def body(x, w0, w1, w2, bias, split, y):
        for t in T.parallel(tiles * parts):
            panel = T.decl_buffer((k * width,), "float32")
            stage = T.decl_buffer((_V * width,), "float32")
            tr = T.decl_buffer((512,), "float32", scope=ACC_SCOPE)
            accs = T.decl_buffer((width,), "float32", scope=ACC_SCOPE)
            b0: T.let = t // parts * width
            part: T.let = t % parts
            for kb in range(k // _V):
                for cb in T.unroll(acc):
                    for r in T.unroll(_V):
                        tr[T.Ramp(r * _V, 1, _V)] = x[src_row(b0 + cb * _V + r),
                                                      T.Ramp(kb * _V, 1, _V)]  # fmt: skip
                    _transpose(tr)
                    for r in T.unroll(_V):
                        panel[T.Ramp((kb * _V + r) * width + cb * _V, 1, _V)] = _vec(tr, r * _V)
            for q in range(split[part + 1] - split[part]):
                rb: T.let = split[part] + q
                for r in range(_V):
                    i: T.let = rb * _V + r
                    for a in T.unroll(acc):
                        if has_bias:
                            accs[T.Ramp(a * _V, 1, _V)] = T.Broadcast(bias[i], _V)
                        else:
                            accs[T.Ramp(a * _V, 1, _V)] = T.Broadcast(T.float32(0), _V)
                    row_dot(accs, panel, i, w0, w1, w2)
                    for a in T.unroll(acc):
                        stage[T.Ramp(r * width + a * _V, 1, _V)] = _vec(accs, a * _V)
                for cb in T.unroll(acc):
                    for r in T.unroll(_V):
                        tr[T.Ramp(r * _V, 1, _V)] = _vec(stage, r * width + cb * _V)
                    _transpose(tr)
                    for r in T.unroll(_V):
                        if ragged:
                            if b0 + cb * _V + r < batch:
                                y[b0 + cb * _V + r, T.Ramp(rb * _V, 1, _V)] = _vec(tr, r * _V)
                        else:
                            y[b0 + cb * _V + r, T.Ramp(rb * _V, 1, _V)] = _vec(tr, r * _V)

    (d_shape, d_dtype), (i_shape, i_dtype), (p_shape, p_dtype) = weight_args

    if has_bias:

        @T.prim_func
        def panel_spmm_bias(
            x: T.Buffer((batch, k), "float32"),
            w0: T.Buffer(d_shape, d_dtype),
            w1: T.Buffer(i_shape, i_dtype),
            w2: T.Buffer(p_shape, p_dtype),
            split: T.Buffer((parts + 1,), "int32"),
            bias: T.Buffer((n,), "float32"),
            y: T.Buffer((batch, n), "float32"),
        ):
            T.func_attr(KERNEL_ATTRS)
            body(x, w0, w1, w2, bias, split, y)

        return panel_spmm_bias

    @T.prim_func
    def panel_spmm(
        x: T.Buffer((batch, k), "float32"),
        w0: T.Buffer(d_shape, d_dtype),
        w1: T.Buffer(i_shape, i_dtype),
        w2: T.Buffer(p_shape, p_dtype),
        split: T.Buffer((parts + 1,), "int32"),
        y: T.Buffer((batch, n), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        body(x, w0, w1, w2, None, split, y)

    return panel_spmm


def csr_panel_kernel(n: int, k: int, batch: int | None, index_dtype: str, parts: int = 1,
                     bias: bool = False, nnz=None, acc: int | None = None):  # fmt: skip
    """PrimFunc ``(X[B,K], data[nnz], indices[nnz], indptr[N+1], split[parts+1], [bias[N]],
    Y[B,N])``; ``split``: boundaries of ``parts`` runs of 16-row blocks; ``batch=None``: a
    symbolic ``B``."""
    acc = acc or panel_acc(batch)
    width = _V * acc
    nnz = nnz_var() if nnz is None else max(nnz, 1)

    @T.macro
    def row_dot(accs, panel, i, data, indices, indptr):
        for j in range(indptr[i], indptr[i + 1]):
            for a in T.unroll(acc):
                accs[T.Ramp(a * _V, 1, _V)] = accs[T.Ramp(a * _V, 1, _V)] + T.Broadcast(
                    data[j], _V
                ) * panel[T.Ramp(T.Cast("int32", indices[j]) * width + a * _V, 1, _V)]

    specs = [((nnz,), "float32"), ((nnz,), index_dtype), ((n + 1,), "int32")]
    return _frame(n, k, batch, acc, parts, row_dot, specs, bias)


def nm_panel_kernel(n: int, k: int, batch: int | None, nm: tuple[int, int], kept: int, parts: int = 1,
                    bias: bool = False):  # fmt: skip
    """PrimFunc ``(X[B,K], values[N,kept], packed[N,kept/per_word], dummy[1], split[parts+1],
    [bias[N]], Y[B,N])``: the :class:`~.formats.NMWeight` arrays (offsets ``bits`` per uint32;
    padding entries hold 0 and are clamped into ``K``)."""
    keep_n, m = (int(v) for v in nm)
    bits = 2 if m <= 4 else 4
    per_word = 32 // bits
    words = kept // per_word
    mask = (1 << bits) - 1
    acc = panel_acc(batch)
    width = _V * acc

    @T.macro
    def row_dot(accs, panel, i, values, packed, unused):
        for w in range(words):
            for t in T.unroll(per_word):
                for a in T.unroll(acc):
                    accs[T.Ramp(a * _V, 1, _V)] = accs[T.Ramp(a * _V, 1, _V)] + T.Broadcast(
                        values[i, w * per_word + t], _V
                    ) * panel[T.Ramp(T.min(
                        (w * per_word + t) // keep_n * m + T.Cast("int32", (
                            packed[i, w] >> T.uint32(bits * t)) & T.uint32(mask)),
                        k - 1,
                    ) * width + a * _V, 1, _V)]  # fmt: skip

    specs = [((n, kept), "float32"), ((n, words), "uint32"), ((1,), "int32")]
    return _frame(n, k, batch, acc, parts, row_dot, specs, bias)


def panel_chunk(batch) -> int:
    """Panel rows (input features) per K-chunk of :func:`csr_chunked_kernel`: 32 KiB of panel,
    which stays in the 48 KiB L1 of these cores. One thread, 90% CSR, batch 128, 256 output
    rows: 50 GFMA/s with a 32 KiB panel against 33 with a 256 KiB one (same nonzeros)."""
    return max(_V, 32768 // (4 * _V * panel_acc(batch)) // _V * _V)


def chunk_pointers(indices, indptr, k: int, chunk: int) -> np.ndarray:
    """``kptr[N, chunks + 1]`` (int32): row ``i``'s nonzeros in K-chunk ``c`` are
    ``kptr[i, c] : kptr[i, c + 1]`` (column indices sorted within each row, as
    :func:`~.formats.compress_csr` leaves them).

    Examples
    --------
    >>> chunk_pointers(np.array([0, 3, 1]), np.array([0, 2, 3]), 4, 2).tolist()
    [[0, 1, 2], [2, 3, 3]]
    """
    indptr = np.asarray(indptr, np.int64)
    n, chunks = indptr.size - 1, -(-k // chunk)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    key = rows * chunks + np.asarray(indices, np.int64) // chunk
    bounds = np.arange(n)[:, None] * chunks + np.arange(chunks + 1)[None, :]
    return np.searchsorted(key, bounds, side="left").astype(np.int32)


def csr_chunked_kernel(n: int, k: int, batch: int | None, index_dtype: str, parts: int = 1,
                       nnz=None):  # fmt: skip
    """PrimFunc ``(X[B,K], data[nnz], indices[nnz], kptr[N, chunks+1], split[parts+1],
    Y[B,N])``: the CSR panel kernel with ``K`` cut into :func:`panel_chunk` rows, so the panel
    a nonzero reads from is L1-resident. Per chunk: pack the chunk's panel, then every row of
    the task adds its nonzeros of that chunk into its partial sums (``[N, W]``, in L2); after
    the last chunk the partial sums are transposed into ``Y`` as in :func:`csr_panel_kernel`."""
    acc = panel_acc(batch)
    width = _V * acc
    chunk = panel_chunk(batch)
    chunks = -(-k // chunk)
    nnz = nnz_var() if nnz is None else max(nnz, 1)
    if batch is None:
        from tvm import tirx

        batch = tirx.Var("batch", "int64")
    ragged = not isinstance(batch, int) or batch % width != 0
    tiles = (batch + width - 1) // width

    def src_row(row):
        return T.min(row, batch - 1) if ragged else row

    @T.prim_func
    def csr_chunked(
        x: T.Buffer((batch, k), "float32"),
        data: T.Buffer((nnz,), "float32"),
        indices: T.Buffer((nnz,), index_dtype),
        kptr: T.Buffer((n, chunks + 1), "int32"),
        split: T.Buffer((parts + 1,), "int32"),
        y: T.Buffer((batch, n), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for t in T.parallel(tiles * parts):
            panel = T.decl_buffer((chunk * width,), "float32")
            part_sums = T.decl_buffer((n * width,), "float32")
            tr = T.decl_buffer((512,), "float32", scope=ACC_SCOPE)
            accs = T.decl_buffer((width,), "float32", scope=ACC_SCOPE)
            b0: T.let = t // parts * width
            part: T.let = t % parts
            for c in range(chunks):
                base: T.let = c * chunk
                for kb in range(T.min(chunk, k - c * chunk) // _V):
                    for cb in T.unroll(acc):
                        for r in T.unroll(_V):
                            tr[T.Ramp(r * _V, 1, _V)] = x[src_row(b0 + cb * _V + r),
                                                          T.Ramp(base + kb * _V, 1, _V)]  # fmt: skip
                        _transpose(tr)
                        for r in T.unroll(_V):
                            panel[T.Ramp((kb * _V + r) * width + cb * _V, 1, _V)] = _vec(
                                tr, r * _V
                            )
                for q in range((split[part + 1] - split[part]) * _V):
                    i: T.let = split[part] * _V + q
                    for a in T.unroll(acc):
                        if c == 0:
                            accs[T.Ramp(a * _V, 1, _V)] = T.Broadcast(T.float32(0), _V)
                        else:
                            accs[T.Ramp(a * _V, 1, _V)] = _vec(part_sums, i * width + a * _V)
                    for j in range(kptr[i, c], kptr[i, c + 1]):
                        for a in T.unroll(acc):
                            accs[T.Ramp(a * _V, 1, _V)] = accs[T.Ramp(a * _V, 1, _V)] + T.Broadcast(
                                data[j], _V
                            ) * panel[T.Ramp(
                                (T.Cast("int32", indices[j]) - base) * width + a * _V, 1, _V
                            )]  # fmt: skip
                    for a in T.unroll(acc):
                        part_sums[T.Ramp(i * width + a * _V, 1, _V)] = _vec(accs, a * _V)
            for q in range(split[part + 1] - split[part]):
                rb: T.let = split[part] + q
                for cb in T.unroll(acc):
                    for r in T.unroll(_V):
                        tr[T.Ramp(r * _V, 1, _V)] = _vec(part_sums, (rb * _V + r) * width + cb * _V)
                    _transpose(tr)
                    for r in T.unroll(_V):
                        if ragged:
                            if b0 + cb * _V + r < batch:
                                y[b0 + cb * _V + r, T.Ramp(rb * _V, 1, _V)] = _vec(tr, r * _V)
                        else:
                            y[b0 + cb * _V + r, T.Ramp(rb * _V, 1, _V)] = _vec(tr, r * _V)

    return csr_chunked
