"""Loop helpers shared by our CPU schedule rules, and the rule for injective loop nests.

Part of :mod:`graphprune.codegen.cpu_rules` (split off to keep modules small): the helpers that
read loop extents (constant or symbolic), the SIMD width of a target, and :class:`Injective`,
which :mod:`.cpu_rules`'s contraction rule also uses for the producers it leaves separate.
Symbolic extents (dynamic batch or sequence axes) are planned with :data:`NOMINAL_EXTENT`, so
one set of rules serves static and dynamic shapes.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

__all__ = [
    "MIN_PARALLEL_ELEMENTS", "MIN_PARALLEL_WORK", "NOMINAL_EXTENT", "REFUSED", "Injective",
    "const_extent", "is_cpu", "largest_divisor", "planning_extent", "schedule_injective_block",
    "vector_lanes",
]  # fmt: skip

REFUSED = (
    s_tir.schedule.ScheduleError,
    tvm.error.InternalError,
    RuntimeError,
    ValueError,
    IndexError,
)


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """SIMD lanes for ``dtype_bits`` elements on an llvm ``target``, from the features LLVM
    gives its ``mcpu`` (a name table went stale: ``cooperlake`` got 128-bit vectors)."""
    from tvm.target import codegen

    with target:
        if codegen.target_has_features("avx512f", target):
            bits = 512
        elif codegen.target_has_features("avx2", target) or codegen.target_has_features(
            "avx", target
        ):
            bits = 256
        else:
            bits = 128  # SSE, NEON
    return max(1, bits // dtype_bits)


def largest_divisor(extent: int, limit: int, powers_of_two: bool = False) -> int:
    for f in range(min(limit, extent), 0, -1):
        if extent % f == 0 and (not powers_of_two or f & (f - 1) == 0):
            return f
    return 1


def const_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


# Symbolic extents (a dynamic batch or sequence axis) are planned as if they were this size:
# large, and divisible by every vector width and tile size the rules pick, so
# tiling decisions are the ones a large static extent gets; splits of the real extent then get a
# predicated tail (``T.where``). One set of rules serves static and symbolic extents.
NOMINAL_EXTENT = 16 * 720720  # 16 * lcm(1..16): any vector width times any tile


# A parallel loop costs a fork-join of TVM's thread pool (waking the workers, then a barrier):
# microseconds, as much as a whole small kernel (the late layers of a CNN at small inputs take
# 2-10 us). Kernels with less work than this run serially. Contractions count multiply-adds
# (every loop extent), injective nests the elements they write. A symbolic extent is planned at
# NOMINAL_EXTENT, so dynamic shapes keep their parallel loops.
MIN_PARALLEL_WORK = 1 << 17
MIN_PARALLEL_ELEMENTS = 1 << 14


def planning_extent(sch: s_tir.Schedule, loop) -> int:
    ext = const_extent(sch, loop)
    return NOMINAL_EXTENT if ext is None else ext


def is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def _same_index_everywhere(stmt) -> bool:
    """Every buffer the block reads is indexed exactly like the one it writes (elementwise):
    fusing the whole nest then leaves one contiguous index, no div/mod per element."""
    out = list(stmt.body.indices) if isinstance(stmt.body, tirx.BufferStore) else None
    if out is None:
        return False
    for region in stmt.reads:
        idx = [r.min for r in region.region]
        if len(idx) != len(out) or any(
            not (isinstance(r, tirx.Var) and r.same_as(o)) for r, o in zip(idx, out)
        ):
            return False
    return True


def schedule_injective_block(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse a root-level spatial nest, run it in parallel and vectorise its tail when exact."""
    stmt = sch.get(block)
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars):
        return
    loops = sch.get_loops(block)
    if not loops:
        return
    elements = 1
    for lp in loops:
        elements *= planning_extent(sch, lp)
    parallel = sch.parallel if elements >= MIN_PARALLEL_ELEMENTS else (lambda loop: None)
    inner_ext = const_extent(sch, loops[-1])
    inner_vec = largest_divisor(inner_ext, lanes, powers_of_two=True) if inner_ext else 1
    if inner_vec >= 4 and len(loops) > 1:
        # Keep the nest: the innermost axis is vectorised with affine indices. Fusing it with
        # the others would leave a div/mod per element (reshape+transpose of attention heads
        # ran at ~2 ns per element that way).
        _, iv = sch.split(loops[-1], [None, inner_vec])
        sch.vectorize(iv)
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if planning_extent(sch, outer) >= 2:
            parallel(outer)
        return
    if inner_ext is None and len(loops) > 1:
        # A symbolic innermost axis (a dynamic sequence: attention's key axis, the row copies
        # of a padded operand): keep the nest, the rows in parallel, the inner loop left to
        # LLVM's vectoriser. Fusing it would give every element int64 divisions by symbolic
        # extents (the padded copy of P before P @ V took 10x the matmul itself that way).
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if planning_extent(sch, outer) >= 2:
            parallel(outer)
        return
    if len(loops) > 1 and not _same_index_everywhere(stmt):
        # A short innermost axis (the 3 colour channels of an NCHW->NHWC input transpose or
        # of the stem conv's pad): fusing the nest would give every lane a div/mod by the row
        # length and a gather (~1 ns per element, 150 us for a 224x224 image). A plain nest
        # over (row, short axis), the short axis unrolled, is what LLVM's loop vectoriser
        # turns into contiguous loads plus an interleaved store: 16x faster here.
        rows = sch.fuse(*loops[:-2]) if len(loops) > 2 else None
        if inner_ext is not None and inner_ext <= 8:
            sch.unroll(loops[-1])
        if rows is not None and planning_extent(sch, rows) >= 2:
            parallel(rows)
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = const_extent(sch, fused)
    if ext is None:  # symbolic: parallel, vectorised in the body where LLVM can
        parallel(fused)
        return
    vec = largest_divisor(ext, lanes, powers_of_two=True)
    if vec > 1 and ext // vec >= 2:
        outer, inner = sch.split(fused, [None, vec])
        parallel(outer)
        sch.vectorize(inner)
    elif ext >= 64:
        parallel(fused)


class Injective(ScheduleRule):
    """Parallel + vectorised loops for PrimFuncs made only of spatial (elementwise, transpose,
    pad, reshape) blocks."""

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            if not blocks:
                return None
            for b in blocks:
                if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars):
                    return None
            # Inline intermediate blocks so one loop nest writes the output.
            for b in blocks[:-1]:
                try:
                    sch.compute_inline(b)
                except REFUSED:
                    pass
            lanes = vector_lanes(target)
            for b in sch.get_child_blocks(sch.get_sblock("root")):
                schedule_injective_block(sch, b, lanes)
            return sch
        except REFUSED:
            return None
