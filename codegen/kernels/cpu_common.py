"""What the CPU sparse kernels share: the calling convention, batch segmentation, SIMD width.

Convention (every kernel in this package): the activation arrives transposed, ``XT[K, B]``, and
the result leaves transposed, ``YT[N, B]``, so that the batch is the contiguous axis of both and
the kernels vectorise over it (one weight value broadcast against a vector of batch columns).
For ``B == 1`` the transposes are free reshapes and the kernels vectorise over the weight's own
nonzeros instead (gathered activations). The Relax rewrite adds the transposes around the call.
The exception are the row-major panel kernels of :mod:`.cpu_panel` (``X[B, K]`` in, ``Y[B, N]``
out), which transpose 16 × 16 blocks in registers inside the kernel; the rewrite prefers them
where they apply (Linears, AVX-512, sizes multiples of 16, 16 or more rows, or a symbolic batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

__all__ = [
    "BatchPlan", "plan_batch", "batch_tiles", "simd_lanes", "KERNEL_ATTRS", "PARALLEL_CHUNKS",
    "ACC_SCOPE", "balanced_row_split", "even_chunks", "nnz_var",
]  # fmt: skip

# Our kernels are scheduled by construction: the schedule pass must leave them alone.
KERNEL_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True}
# Parallel tasks per kernel: TVM's pool gives each of its threads a contiguous run of tasks, so
# 16 equal tasks balance 1, 2, 4, 8 or 16 threads exactly.
PARALLEL_CHUNKS = 16
# Scope of the kernels' accumulator buffers. TVM lowers a "local" buffer of a CPU function to
# TVMBackendAllocWorkspace calls (heap, and LLVM must store every update back to it); a "global"
# decl_buffer becomes an LLVM alloca that SROA keeps in registers.
ACC_SCOPE = "global"


def even_chunks(rows: int) -> tuple[int, int]:
    """``(chunks, rows per chunk)`` for rows of equal cost."""
    chunks = max(1, min(PARALLEL_CHUNKS, rows))
    return chunks, -(-rows // chunks)


def balanced_row_split(indptr, chunks: int = PARALLEL_CHUNKS):
    """Row boundaries ``[chunks + 1]`` (int32) cutting a CSR/BSR row pointer into ``chunks``
    runs of about equal nonzero counts (rows stay whole; runs may be empty).

    Examples
    --------
    >>> balanced_row_split(np.array([0, 8, 9, 10, 16]), 2).tolist()
    [0, 1, 4]
    """
    indptr = np.asarray(indptr, np.int64)
    rows = indptr.size - 1
    targets = np.arange(chunks + 1) * (indptr[-1] / chunks)
    split = np.searchsorted(indptr, targets, side="left").clip(0, rows)
    split[0], split[-1] = 0, rows
    return np.maximum.accumulate(split).astype(np.int32)


def simd_lanes(target=None) -> int:
    """fp32 lanes of the target's widest vector register (16 with AVX-512, 8 with AVX2)."""
    if target is None:
        return 16
    from graphprune.codegen.cpu_rules import vector_lanes

    return vector_lanes(target, 32)


@dataclass(frozen=True)
class BatchPlan:
    """The batch axis cut into register-resident chunks: ``full`` chunks of ``acc * lanes``
    columns, then ``vec`` chunks of ``lanes`` columns, then one ``tail`` of fewer columns."""

    lanes: int
    acc: int
    full: int
    vec: int
    tail: int

    @property
    def full_width(self) -> int:
        return self.acc * self.lanes

    @property
    def vec_base(self) -> int:
        return self.full * self.full_width

    @property
    def tail_base(self) -> int:
        return self.vec_base + self.vec * self.lanes


def batch_tiles(p: BatchPlan, chunk):
    """A TVMScript macro ``tiles(*args)`` that runs the macro ``chunk(*args, base, nacc,
    width)`` over ``p``'s column tiles: ``p.full`` tiles of ``p.acc`` vectors, ``p.vec`` tiles
    of one vector, then the tail (emitted only when there is one)."""

    @T.macro
    def tiles(*args):
        for bo in range(p.full):
            chunk(*args, bo * p.full_width, p.acc, p.lanes)
        for bv in range(p.vec):
            chunk(*args, p.vec_base + bv * p.lanes, 1, p.lanes)
        if p.tail > 0:
            chunk(*args, p.tail_base, 1, p.tail)

    return tiles


def plan_batch(batch: int, lanes: int, max_acc: int) -> BatchPlan:
    """Chunk ``batch`` columns for ``max_acc`` vector accumulators of ``lanes`` each.

    Examples
    --------
    >>> plan_batch(128, 16, 4)
    BatchPlan(lanes=16, acc=4, full=2, vec=0, tail=0)
    >>> plan_batch(50, 16, 4)
    BatchPlan(lanes=16, acc=3, full=1, vec=0, tail=2)
    >>> plan_batch(3, 16, 4)
    BatchPlan(lanes=16, acc=1, full=0, vec=0, tail=3)
    """
    acc = max(1, min(max_acc, batch // lanes))
    full = batch // (acc * lanes)
    rest = batch - full * acc * lanes
    return BatchPlan(lanes, acc, full, rest // lanes, rest % lanes)


def nnz_var():
    """A symbolic extent for nonzero-count buffers: one kernel serves every density."""
    from tvm import tirx

    return tirx.Var("nnz", "int32")
