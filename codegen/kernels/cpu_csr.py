"""CSR sparse × dense TensorIR kernel for unstructured weights (CPU).

``YT[N, B] = W[N, K] @ XT[K, B]`` with ``W`` in :class:`~.formats.CSRWeight` plus ``split``, the
row boundaries of ``chunks`` parallel tasks holding equal nonzero counts
(:func:`~.cpu_common.balanced_row_split`): TVM's thread pool hands each thread a contiguous run
of tasks, so unequal rows still give every core the same work, and each task allocates its
accumulators once instead of once per row.

``B > 1``: each row walks its nonzeros once per batch chunk with ``acc`` vector accumulators of
``lanes`` batch columns (one index + one value load amortised over ``acc`` FMAs).

``B == 1`` (memory-bound matvec): the row's nonzeros are the vector. ``unroll`` independent
vector accumulators take ``lanes`` values (one contiguous load) times ``lanes`` gathered
activations each, then a vector remainder, a scalar tail and one horizontal sum per row.
``gather`` picks how the activations are gathered (4096², 90%, one thread, AMD EPYC Zen 5 VM,
best of 9 under load: int16 ``staged`` 0.56 ms, int16 ``insert`` 0.65, ``vgather`` 0.71; on a
quieter machine, best of 10: ``word`` 0.305-0.312 ms (0.316-0.322 with 16-lane vectors),
``staged`` 0.338-0.353):

* ``"word"`` (default): the row's indices are read as ``uint64`` words (4 int16 or 2 int32
  indices per load) and split with shifts and masks in general registers; each activation is a
  scalar load inserted into a register vector. One load per nonzero plus a quarter, against
  ``staged``'s two. Needs every row to start on a word: :func:`pad_rows` pads each row's
  nonzeros with explicit zeros (column 0) to a multiple of :func:`word_indices`.
* ``"staged"``: each lane's activation is a scalar load with the int16 index folded
  in (``movswq`` from memory), inserted into a register vector;
* ``"insert"``: a vectorised load of the row's indices; LLVM then extracts every int16 lane with
  ``vpextrw`` (one more shuffle per nonzero) before the same inserts;
* ``"vgather"``: AVX-512 ``vgatherdps``, slower on this Zen and, with the Downfall microcode,
  on Intel parts; kept for CPUs where it pays.

Tried and dropped (same shape and conditions, CSR ``staged`` 0.35 ms on a quieter machine):

* ``word`` with the activations staged through a memory buffer and read back as one vector
  (no inserts): 0.56-0.69 ms, the wide load waits for its 16 narrow stores (no forwarding).
* ``word`` with every 2nd, 3rd or 4th 8-lane vector gathered by ``vgatherdps`` instead (to
  spread the work over the gather unit and the shuffle ports): 0.33-0.39 ms against 0.31.
* rows padded to 8 nonzeros (no scalar tail at all) instead of 4: within 1-3%, not kept.
* ``word`` with each lane filled by a merge-masked ``vbroadcastss`` from memory (no shuffle
  port; the masks are opaque to LLVM through ``lane == l + indptr[0]``, else it folds them back
  to ``vinsertps``): 0.47-0.52 ms against 0.39-0.41 in the same (loaded) run.
* scalar FMAs with 4-16 independent accumulators (one index load, one activation load, one
  memory-operand ``vfmadd231ss`` per nonzero; written with ``llvm.x86.avx512.vfmadd.f32``
  because LLVM's SLP vectoriser turns plain scalar FMAs back into ``vgatherdps``): 0.49-0.51
  ms. Three loads per nonzero against ``staged``'s two: this core sustains about two of these
  loads per cycle, which is also what holds ``staged`` near one nonzero per cycle.
* a bitmap format (per 16 columns a ``uint16`` mask plus the packed values, expanded into lanes
  with AVX-512 ``vexpandps`` and one FMA against 16 contiguous activations: cost per group of
  16 columns instead of per nonzero, 8.7 MB instead of 10 MB): 0.97 ms with a prefix-masked
  load and the register ``vexpandps``, 1.4 ms with ``llvm.masked.expandload`` (memory-form
  ``vexpandps``), 0.69 ms even with the expand left out (wrong results; the floor of its
  serially dependent unaligned loads), and 5.4 ms at 50% sparsity where CSR took 2.4 ms (the
  expand's cost grows with the set lanes on this Zen 5). It needs under 1.6 cycles per group to
  win at 90% and measured 3-4.5, so it is not a candidate. The kernel built and computed
  correctly in TVM 0.27 (the 16-lane bool mask as ``(broadcast(m) & (1 << lane)) != 0``,
  which LLVM folds to one ``kmovw``; ``T.reinterpret("boolx16", m)`` is refused because TVM
  counts a bool as 8 bits).

Scalars are ``T.let`` bindings (a plain assignment would become a "local" buffer, i.e. a heap
workspace) and accumulators live in registers (:data:`~.cpu_common.ACC_SCOPE`), so the inner
loop is loads, inserts and FMAs only; TVM emits no bounds checks.

Written directly as loop-level TIR (no ``sblock``): the nonzero loop has data-dependent bounds,
which the schedule primitives cannot tile, and the loop nest *is* the schedule.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from graphprune.codegen.kernels.cpu_common import (
    ACC_SCOPE,
    KERNEL_ATTRS,
    batch_tiles,
    nnz_var,
    plan_batch,
)

__all__ = ["csr_kernel", "GATHERS", "pad_rows", "word_indices"]

GATHERS = ("word", "staged", "insert", "vgather")


def word_indices(index_dtype) -> int:
    """Column indices per ``uint64`` word for the ``word`` gather (4 int16, 2 int32)."""
    return 8 // np.dtype(index_dtype).itemsize


def pad_rows(data, indices, indptr, multiple: int):
    """CSR arrays with every row's nonzeros padded by explicit zeros (at column 0) to a multiple
    of ``multiple``, and the total to at least ``multiple``: what the ``word`` gather reads.

    Examples
    --------
    >>> d, i, p = pad_rows(np.ones(3, "f4"), np.array([2, 0, 1], "i2"), np.array([0, 1, 3]), 2)
    >>> d.tolist(), i.tolist(), p.tolist()
    ([1.0, 0.0, 1.0, 1.0], [2, 0, 0, 1], [0, 2, 4])
    """
    indptr = np.asarray(indptr, np.int64)
    counts = np.diff(indptr)
    padded = np.zeros(indptr.size, np.int64)
    np.cumsum(-(-counts // multiple) * multiple, out=padded[1:])
    rows = np.repeat(np.arange(counts.size), counts)
    dest = padded[rows] + np.arange(int(indptr[-1])) - indptr[rows]
    size = max(int(padded[-1]), multiple)
    new_data, new_indices = np.zeros(size, data.dtype), np.zeros(size, indices.dtype)
    new_data[dest], new_indices[dest] = data, indices
    return new_data, new_indices, padded.astype(np.int32)


def csr_kernel(n: int, k: int, batch: int, index_dtype: str, lanes: int = 16, nnz=None,
               chunks: int = 1, unroll: int | None = None, gather: str = "word"):  # fmt: skip
    """PrimFunc ``(XT[K,B], data[nnz], indices[nnz], indptr[N+1], split[chunks+1], YT[N,B])``.

    At batch 1 with ``gather="word"`` the arrays must come through :func:`pad_rows` with
    ``word_indices(index_dtype)``. ``unroll`` defaults to the measured best (4 vectors of at
    most 8 lanes for ``word``, 2 of ``lanes`` for the others)."""
    nnz = nnz_var() if nnz is None else max(nnz, 1)  # zero-length buffers are not allowed
    if batch == 1:
        if gather not in GATHERS:
            raise ValueError(f"gather must be one of {GATHERS}, not {gather!r}")
        if gather == "vgather" and lanes != 16:
            gather = "staged"
        if gather == "word" and lanes % word_indices(index_dtype):
            gather = "staged"
        if gather == "word":
            # 8-lane vectors: one vinsertf128 joins two 4-lane inserts, where 16 lanes also
            # need a vinsertf64x4 per vector (3-12% faster on the benchmark shapes)
            lanes, unroll = min(lanes, 8), unroll or 4
        unroll = unroll or 2
        return _csr_b1(n, k, nnz, index_dtype, lanes, chunks, unroll, gather)
    p = plan_batch(batch, lanes, 4)

    @T.macro
    def chunk(x, data, indices, indptr, y, acc, i, base, nacc, width):
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                acc[a * width + l] = T.float32(0)
        for j in range(indptr[i], indptr[i + 1]):
            # no T.let here: a macro expanded twice would bind the same Var twice
            for a in T.unroll(nacc):
                for l in T.vectorized(width):
                    acc[a * width + l] = (
                        acc[a * width + l]
                        + data[j] * x[T.Cast("int32", indices[j]), base + a * width + l]
                    )
        for a in T.unroll(nacc):
            for l in T.vectorized(width):
                y[i, base + a * width + l] = acc[a * width + l]

    tiles = batch_tiles(p, chunk)

    @T.prim_func
    def csr_spmm(
        x: T.Buffer((k, batch), "float32"),
        data: T.Buffer((nnz,), "float32"),
        indices: T.Buffer((nnz,), index_dtype),
        indptr: T.Buffer((n + 1,), "int32"),
        split: T.Buffer((chunks + 1,), "int32"),
        y: T.Buffer((n, batch), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for t in T.parallel(chunks):
            acc = T.decl_buffer((p.acc * p.lanes,), "float32", scope=ACC_SCOPE)
            # rows as an offset from a bound start: with ``range(split[t], split[t + 1])`` this
            # TVM computed every chunk after the first from chunk 0's rows (wrong results)
            for r in range(split[t + 1] - split[t]):
                i: T.let = split[t] + r
                tiles(x, data, indices, indptr, y, acc, i)

    return csr_spmm


def _csr_b1(n, k, nnz, index_dtype, lanes, chunks, unroll, gather):
    width = unroll * lanes
    ivec, fvec = f"int32x{lanes}", f"float32x{lanes}"
    per = word_indices(index_dtype)
    bits = 64 // per

    @T.macro
    def fma(acc, stage, a, x, data, indices, words, base):
        if gather == "word":
            # base is a multiple of per (rows padded); a masked shift, not a sign extension:
            # indices are below 2**15 (int16) or K (int32), never negative
            for q in T.unroll(lanes // per):
                for l in T.unroll(per):
                    stage[a * lanes + q * per + l] = x[T.Cast("int32", (
                        words[base // per + q] >> T.uint64(bits * l)
                    ) & T.uint64((1 << bits) - 1)), 0]  # fmt: skip
            for l in T.vectorized(lanes):
                acc[a * lanes + l] = acc[a * lanes + l] + data[base + l] * stage[a * lanes + l]
        elif gather == "vgather":
            acc[T.Ramp(a * lanes, 1, lanes)] = acc[T.Ramp(a * lanes, 1, lanes)] + data[
                T.Ramp(base, 1, lanes)
            ] * T.call_llvm_pure_intrin(
                fvec, "llvm.x86.avx512.mask.gather.dps.512", T.Broadcast(T.float32(0), lanes),
                T.address_of(x[0, 0]), T.Cast(ivec, indices[T.Ramp(base, 1, lanes)]),
                T.Broadcast(T.bool(True), lanes), T.int32(4),
            )  # fmt: skip
        elif gather == "insert":
            for l in T.vectorized(lanes):
                acc[a * lanes + l] = (
                    acc[a * lanes + l] + data[base + l] * x[T.Cast("int32", indices[base + l]), 0]
                )
        else:
            for l in T.unroll(lanes):
                stage[a * lanes + l] = x[T.Cast("int32", indices[base + l]), 0]
            for l in T.vectorized(lanes):
                acc[a * lanes + l] = acc[a * lanes + l] + data[base + l] * stage[a * lanes + l]

    @T.prim_func
    def csr_spmv(
        x: T.Buffer((k, 1), "float32"),
        data: T.Buffer((nnz,), "float32"),
        indices: T.Buffer((nnz,), index_dtype),
        indptr: T.Buffer((n + 1,), "int32"),
        split: T.Buffer((chunks + 1,), "int32"),
        y: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        words = T.decl_buffer((nnz // per,), "uint64", data=indices.data)
        for t in T.parallel(chunks):
            acc = T.decl_buffer((width,), "float32", scope=ACC_SCOPE)
            stage = T.decl_buffer((width,), "float32", scope=ACC_SCOPE)
            total = T.decl_buffer((1,), "float32", scope=ACC_SCOPE)
            for r in range(split[t + 1] - split[t]):
                i: T.let = split[t] + r
                start: T.let = indptr[i]
                end: T.let = indptr[i + 1]
                steps: T.let = (end - start) // width
                mid: T.let = start + steps * width
                vsteps: T.let = (end - mid) // lanes
                tail: T.let = mid + vsteps * lanes
                for l in T.vectorized(width):
                    acc[l] = T.float32(0)
                for s in range(steps):
                    for a in T.unroll(unroll):
                        fma(acc, stage, a, x, data, indices, words, start + s * width + a * lanes)
                for s in range(vsteps):
                    fma(acc, stage, 0, x, data, indices, words, mid + s * lanes)
                for a in T.unroll(1, unroll):
                    for l in T.vectorized(lanes):
                        acc[l] = acc[l] + acc[a * lanes + l]
                total[0] = T.float32(0)
                for l in T.unroll(lanes):
                    total[0] = total[0] + acc[l]
                for j in range(tail, end):
                    total[0] = total[0] + data[j] * x[T.Cast("int32", indices[j]), 0]
                y[i, 0] = total[0]

    return csr_spmv
