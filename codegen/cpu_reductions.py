"""Our CPU schedule rule for row reductions over the last axis: softmax, LayerNorm, RMSNorm, a
``max``/``sum``/``mean`` over the last axis, with the elementwise prologue and epilogue that
``FuseOps`` put in the same PrimFunc (attention's scale and mask before its softmax, the
``where`` of a fully masked row after it, the residual add before a LayerNorm).

Runs where the other rules of :mod:`graphprune.codegen.cpu_rules` run (after ``FuseOps`` /
``FuseTIR`` on the legalized module, see :func:`graphprune.codegen.build.cpu_rules`), after
:class:`~graphprune.codegen.cpu_rules.Contraction` and before the fallbacks. Before it, these
PrimFuncs went to dlight's generic ``Reduction`` rule: a pass over the whole tensor per
intermediate (softmax: max, delta, exp, sum, normalise, five tensors written), 4-6x slower than
ONNX Runtime's softmax and 3x slower than OpenVINO's LayerNorm on BERT-base, and 4x slower again
with a symbolic key length.

Two schedules, by row length (the last axis of the output, the reductions' axis):

* **Whole vectors** (a constant multiple of the SIMD width: LayerNorm over 768, softmax over
  128 keys): one parallel loop over rows (the fused leading axes; a symbolic batch x sequence is
  just its extent) with every block computed at the row. Elementwise intermediates are inlined
  where they are read, except a full-row one that two passes read (softmax's ``exp``, read by
  the sum and by the output): it is computed once into a row buffer (``compute_at`` compacts
  it to one row, 1.5x faster than computing it twice); each reduction updates ``lanes`` partial accumulators with whole
  vectors (``rfactor``), then combines them; the output is written with vectors. The row is
  re-read from L1 by each pass.
* **A constant length with a tail** (77 keys): a parallel loop nest per block, the vector loops
  split with a predicated tail, which ``LoopPartition`` peels before ``VectorizeLoop``. Not
  computed at the row: ``compute_at`` (TVM 0.27) drops the predicate of the block it moves,
  and the partial accumulators would read past the row.
* **A symbolic length** (attention's key length in a dynamic artifact): the first schedule
  without the row buffer (it would be allocated per row: 2x slower at 16 or 77 keys, measured),
  its vector loops split with a tail. TVM 0.27 cannot vectorise such a split itself:
  ``LoopPartition`` does not peel a symbolic-extent tail (the loop stays scalarised),
  ``Schedule.loop_partition`` refuses symbolic extents, buffer-level predication
  (``tirx.enable_buffer_level_predication``) emits an ill-typed ``llvm.get.active.lane.mask``
  for int64 indices, and ``compute_at`` drops the partials' predicate. So the rule marks each
  split and :func:`.tail_peel.peel_tails` rewrites it into whole vectors plus a scalar tail
  (re-adding the predicate there). Softmax of BERT-base attention (12 heads, x * scale + mask
  before it), 1 thread, loaded machine: dynamic / static 1.06 at 77 keys, 1.3-1.5 at 128 and
  384 (the static rule keeps ``exp`` in the row buffer), 1.7 at 16 (4 us); it was 5.7-8.9x
  with scalar loops.
"""

from __future__ import annotations

from graphprune.codegen.cpu_loops import REFUSED, const_extent, is_cpu, vector_lanes
from graphprune.codegen.tail_peel import mark_tail, peel_tails
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

__all__ = ["RowReduction"]


def _is_reduction(stmt) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in stmt.iter_vars)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))


def _last_axis_reduction(stmt) -> bool:
    """One reduction iterator, the last one, indexing only the last axis of what it reads, and
    not the output (``out[rows] = f(out[rows], x[rows, k])``)."""
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds.count(tirx.IterVar.CommReduce) != 1 or kinds[-1] != tirx.IterVar.CommReduce:
        return False
    k = stmt.iter_vars[-1].var
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or any(_uses(i, k) for i in body.indices):
        return False
    for region in stmt.reads:
        idx = [r.min for r in region.region]
        if any(_uses(i, k) for i in idx[:-1]):
            return False
    return True


class RowReduction(ScheduleRule):
    """Parallel over rows, vectorised along the row, for PrimFuncs whose reductions all run over
    the last axis (softmax, LayerNorm, RMSNorm, row max/sum/mean) plus elementwise blocks.

    Declines (returns ``None``) anything else: more than one reduction axis (pooling), a
    reduction over another axis, a contraction (left to ``Contraction``), or a function where a
    schedule primitive refuses (an intermediate that cannot be computed per row).
    """

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        try:
            return self._schedule(func, target)
        except REFUSED:
            return None

    def _schedule(self, func, target):
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        stmts = [sch.get(b) for b in blocks]
        reductions = [b for b, s in zip(blocks, stmts) if _is_reduction(s)]
        if not reductions or not all(_last_axis_reduction(sch.get(b)) for b in reductions):
            return None
        out = blocks[-1]
        lanes = vector_lanes(target, self._dtype_bits(sch.get(out)))
        if not sch.get_loops(out)[:-1]:  # a 1-D tensor reduced to a scalar: no rows
            return None
        lengths = [const_extent(sch, sch.get_loops(b)[-1]) for b in reductions + [out]]
        whole = all(n is not None and n % lanes == 0 for n in lengths)
        # Inline the elementwise intermediates (recomputed where read), except, in rows of whole
        # vectors, a full-row one read by two passes (softmax's exp): that one is stored in a
        # row buffer (``compute_at`` compacts it to one row) and computed once.
        rank = len(sch.get(out).iter_vars)
        kept = []
        for b in blocks[:-1]:
            if _is_reduction(sch.get(b)):
                continue
            if whole and len(sch.get_consumers(b)) >= 2 and len(sch.get(b).iter_vars) == rank:
                kept.append(sch.get(b).name_hint)
                continue
            sch.compute_inline(b)
        blocks = sch.get_child_blocks(root)
        names = [sch.get(b).name_hint for b in blocks[:-1]]
        if any(not _is_reduction(sch.get(b)) and n not in kept for b, n in zip(blocks, names)):
            return None
        if not whole and None not in lengths:
            self._nest_per_block(sch, blocks, lanes)
            return sch
        # Whole vectors, or a symbolic row length: its vector loops are split with a tail
        # that :func:`.tail_peel.peel_tails` peels (see the module docstring).
        tails: list = []
        self._row_at_a_time(sch, root, blocks, lanes, tails)
        for name in kept:
            self._vectorise_loop(sch, sch.get_loops(sch.get_sblock(name))[-1], lanes, tails)
        return s_tir.Schedule(peel_tails(sch.mod["main"], tails)) if tails else sch

    def _row_at_a_time(self, sch, root, blocks, lanes: int, tails: list) -> None:
        """Every block computed at the row (one parallel loop, the row re-read from L1 by each
        pass); vector partials and output, with a tail marked for peeling (``tails``) where
        the row length is symbolic."""
        out = blocks[-1]
        out_is_reduction = _is_reduction(sch.get(out))
        # Partial accumulators first, while every block is still a loop nest of its own.
        partials = [self._partial_sums(sch, b, lanes) for b in blocks]
        row_loops = sch.get_loops(out)[:-1]  # a reduction output: its partials' combine
        row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
        sch.parallel(row)
        for b in reversed(sch.get_child_blocks(root)[:-1]):
            sch.compute_at(b, row, preserve_unit_loops=False)
        for part in partials:
            if part is not None:
                self._vectorise_partials(sch, *part, tails)
        if not out_is_reduction:
            self._vectorise_loop(sch, sch.get_loops(out)[-1], lanes, tails)

    def _nest_per_block(self, sch, blocks, lanes: int) -> None:
        """Rows of a constant length with a tail (not a multiple of ``lanes``): each block keeps a parallel loop nest of its own, so the tail's predicate stays on its block
        (``compute_at`` would drop it) and ``LoopPartition`` splits the vector loop from the
        tail before ``VectorizeLoop`` runs. The passes re-read the rows from L2."""
        for b in blocks:
            if _is_reduction(sch.get(b)):
                k = sch.get_loops(b)[-1]
                ext = const_extent(sch, k)
                if ext is None or ext >= 2 * lanes:
                    _, ki = sch.split(k, [None, lanes])
                    rf = sch.rfactor(ki, factor_axis=0)
                    loops = sch.get_loops(rf)
                    row = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
                    sch.parallel(row)
                    sch.vectorize(loops[-1])
                    init = sch.decompose_reduction(rf, loops[-2])
                    sch.vectorize(sch.get_loops(init)[-1])
                loops = sch.get_loops(b)
                row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                sch.parallel(row)
            else:
                loops = sch.get_loops(b)
                row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                sch.parallel(row)
                _, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)

    @staticmethod
    def _dtype_bits(stmt) -> int:
        import tvm

        return tvm.runtime.DataType(str(stmt.body.buffer.dtype)).bits

    @staticmethod
    def _vectorise_loop(sch, loop, lanes: int, tails: list) -> None:
        """Whole vectors, or a symbolic extent with its tail marked for peeling: a constant
        split with a tail would need a predicate, which the vectoriser scalarises."""
        ext = const_extent(sch, loop)
        if ext is not None and ext % lanes:
            return
        n = sch.get(loop).extent
        outer, vec = sch.split(loop, [None, lanes])
        sch.vectorize(vec)
        if ext is None:
            mark_tail(sch, outer, n, tails)

    @staticmethod
    def _partial_sums(sch, block, lanes: int):
        """Split a row reduction into ``lanes`` partial accumulators (``rfactor``): returns the
        block that updates them with whole vectors (the original block then combines them)
        and, for a symbolic row length, that length (else ``None``)."""
        if not _is_reduction(sch.get(block)):
            return None
        k = sch.get_loops(block)[-1]
        ext = const_extent(sch, k)
        # A constant length: whole vectors only. A tail would need a predicate on the partials
        # block, and ``compute_at`` (TVM 0.27) drops a block's predicate when it moves the
        # block under the row loop: the partials would read past the row. A symbolic length
        # gets its tail back from :func:`.tail_peel.peel_tails`, which re-adds the predicate.
        if ext is not None and (ext % lanes or ext < 2 * lanes):
            return None
        n = sch.get(k).extent
        _, ki = sch.split(k, [None, lanes])
        return sch.rfactor(ki, factor_axis=0), None if ext is not None else n

    @staticmethod
    def _vectorise_partials(sch, rf, n, tails: list) -> None:
        """Under the row loop, the partials block iterates (lane, k-outer): put the lanes
        innermost, vectorise them, and hoist the init out of the k loop; a symbolic row
        length ``n`` marks the k loop's tail for peeling."""
        loops = sch.get_loops(rf)
        lane, ko = loops[-2], loops[-1]
        sch.reorder(ko, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(rf, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        if n is not None:
            mark_tail(sch, ko, n, tails)
