"""Our CPU schedule rules: contractions (matmul, dense, conv2d, depthwise, batch matmul) and
injective loop nests, in the style of ``tvm.s_tir.dlight`` (a rule matches a PrimFunc and returns
a schedule, or ``None`` to let the next rule try).

Runs after ``FuseOps``/``FuseTIR`` on the legalized module, before the VM lowering passes (see
:mod:`graphprune.codegen.build`). Preconditions set up by the pipeline:

* weights arrive already transposed (``LiftTransformParams`` moved ``permute_dims(W)`` out of the
  model), so a Linear is a plain ``X[m, k] @ Wt[k, n]``;
* convolutions are NHWC / HWIO (``ConvertLayout``), so the output channel is the innermost axis of
  the output, the weight and, for depthwise, the input.

Both facts make the same micro-kernel fit every contraction: the last spatial axis ``c`` is
contiguous in the output and in one operand, which is loaded as a vector, while the other operand
does not depend on ``c`` and is broadcast. A register tile of ``rows x (ct * vec)`` accumulators
(``rows`` along the previous spatial axis: matmul rows, or output columns of a conv) lives in a
``local`` cache that LLVM promotes to registers once the tile loops are unrolled. The stock
pipeline schedules nothing and is ~100x slower than PyTorch on a Linear (shared/TVM_NOTES.md).

Memory layout and loop order (what made the rules match PyTorch on full-size models):

* **Packed weights.** The weight operand ``W[r..., c]`` of a function argument Relax marked as a
  weight (``layout_free_buffers``) is read through a ``layout_rewrite_preproc`` block as
  ``Wp[c // bn, r..., c % bn]`` (``bn`` = the tile's columns), so one output-channel tile reads
  one contiguous panel. The pipeline splits that block off and lifts it: it runs once at build
  time and ``weights.npz`` ships the packed arrays.
* **Panel-major order.** Output-channel tiles are the outermost (parallel) loop; all spatial rows
  (fused, so a 1x1 conv is a GEMM over ``H*W``) stream past one panel while it is in cache.
* **K-blocking** for GEMM-like contractions whose panel exceeds L1: ``kc``-deep slices of the
  reduction, accumulating into the output panel; the rows split into M-blocks
  (:mod:`.cpu_blocking`) where the activation outgrows L2 or the panels are too few or odd in
  number to keep every thread busy, (panel, block) pairs running in parallel.
* **Register tile** ``rows x col_vectors`` chosen per shape (:func:`register_tile`): most FMAs
  per load within the register file (a weight load counted twice where the panel streams from
  L2: a kh x kw > 1 conv, not K-blocked, with a panel over L1), rows forming a box of the output
  so the fused epilogue covers the tile exactly.
* **Parallel grain.** A contraction under :data:`.cpu_loops.MIN_PARALLEL_WORK` multiply-adds
  gets no parallel loop: the thread pool's fork-join costs microseconds, what a late layer of a
  small CNN takes in all (and on loaded cores a barrier waits for a descheduled worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from graphprune.codegen.cpu_blocking import row_blocks
from graphprune.codegen.cpu_loops import (
    MIN_PARALLEL_WORK,
    NOMINAL_EXTENT,
    REFUSED,
    Injective,
    const_extent,
    is_cpu,
    largest_divisor,
    planning_extent,
    schedule_injective_block,
    vector_lanes,
)
from graphprune.codegen.cpu_tiles import k_block, l2_panel_bytes, register_tile
from tvm import ir, s_tir, tirx
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.sym.pattern import detect_linear_equation
from tvm.target import Target

__all__ = ["Contraction", "Injective", "vector_lanes"]

# What a refused schedule primitive raises; a rule that hits one declines the function.


@dataclass(frozen=True)
class ContractionInfo:
    """What a matched contraction block looks like (used for the manifest's kernel report)."""

    block: str
    spatial: tuple[int | str, ...]  # a symbolic extent as its expression
    reduce: tuple[int | str, ...]
    tile: tuple[int, int, int]  # rows, column vectors, lanes
    packed: str | None = None  # weight layout after packing, if packed
    k_block: int | None = None  # reduction slice kept in L1, if blocked
    row_blocks: int = 1  # M-blocks of rows run in parallel with the panels, if K-blocked


def _multiply_add_operands(block):
    """Return the two loads of ``C = C + A * B`` (casts allowed), or ``None``."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return None
    add = store.value
    lhs, rhs = add.a, add.b
    if not (isinstance(lhs, ir.TensorLoad) and lhs.source.same_as(store.buffer)):
        return None
    mul = rhs
    while isinstance(mul, tirx.Cast):
        mul = mul.value
    if not isinstance(mul, tirx.Mul):
        return None

    def strip(e):
        while isinstance(e, tirx.Cast):
            e = e.value
        return e

    a, b = strip(mul.a), strip(mul.b)
    if not (isinstance(a, ir.TensorLoad) and isinstance(b, ir.TensorLoad)):
        return None
    return a, b


def _uses(expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))


def _unit_stride(expr, var: tirx.Var) -> bool:
    """``expr`` is ``var + (something independent of var)``: consecutive var, consecutive address.
    Depthwise NHWC reads ``pad[n, h + ry, w + rx, c + rc]`` with a unit-extent ``rc``."""
    coeffs = detect_linear_equation(expr, [var])
    if len(coeffs) != 2 or not isinstance(coeffs[0], tirx.IntImm) or int(coeffs[0]) != 1:
        return False
    return not _uses(coeffs[1], var)


def _is_copy(stmt) -> bool:
    """The block only copies one element (what a zero-width pad legalizes to)."""
    body = stmt.body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, ir.TensorLoad)


class Contraction(ScheduleRule):
    """Register-tiled, vectorised, parallel schedule for ``C[s..., c] += A[...] * B[..., c]``.

    Matches a PrimFunc with exactly one reduction block of that form whose last spatial iterator
    indexes only the last axis of ``C`` and of one operand. Elementwise epilogues (bias, BN
    scale/shift, ReLU, residual add) are folded into the write-back of the accumulator tile;
    producers (padding, activation transposes) stay separate and get the injective schedule.
    """

    def __init__(self, rows: int = 4, col_vectors: int = 4):
        self.rows = rows
        self.col_vectors = col_vectors
        self.last_match: ContractionInfo | None = None

    def apply(self, func, target: Target, tunable: bool):
        self.last_match = None
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        try:
            return self._schedule(func, target)
        except REFUSED:
            # A primitive refused (non-affine epilogue, odd access): leave it to the next rule.
            return None

    def _schedule(self, func, target):
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        reductions = []
        for b in blocks:
            stmt = sch.get(b)
            if any(iv.iter_type == tirx.IterVar.CommReduce for iv in stmt.iter_vars):
                reductions.append(b)
        if len(reductions) != 1:
            return None
        block = reductions[0]
        stmt = sch.get(block)
        operands = _multiply_add_operands(stmt)
        if operands is None:
            return None
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        n_spatial = kinds.index(tirx.IterVar.CommReduce)
        if n_spatial == 0 or any(k != tirx.IterVar.CommReduce for k in kinds[n_spatial:]):
            return None
        c_var = stmt.iter_vars[n_spatial - 1].var
        out_idx = stmt.body.indices
        if not (out_idx[-1].same_as(c_var) and not any(_uses(i, c_var) for i in out_idx[:-1])):
            return None
        # Every operand that depends on c must read it contiguously (last index exactly c);
        # the others are broadcast. Depthwise conv has two vector operands and no broadcast.
        for op in operands:
            if any(_uses(i, c_var) for i in op.indices[:-1]):
                return None
            if _uses(op.indices[-1], c_var) and not _unit_stride(op.indices[-1], c_var):
                return None
        if not any(_uses(op.indices[-1], c_var) for op in operands):
            return None
        dtype_bits = tvm.runtime.DataType(str(stmt.body.buffer.dtype)).bits
        lanes = vector_lanes(target, dtype_bits)

        loops = sch.get_loops(block)
        if len(loops) != len(kinds):
            return None
        symbolic = [const_extent(sch, lp) is None for lp in loops]
        extents = [planning_extent(sch, lp) for lp in loops]
        # For the manifest: a symbolic extent as its expression (``s31 * s81``).
        shown = tuple(str(sch.get(lp).extent) if sym else e
                      for lp, sym, e in zip(loops, symbolic, extents))  # fmt: skip
        row_extents = extents[: n_spatial - 1]
        work = 1
        for e in extents:
            work *= e
        parallel = work >= MIN_PARALLEL_WORK  # else the fork-join costs more than it saves
        # A row tile must not straddle a row of a symbolic extent (its write-back would cover
        # a box of rows that were not computed): plan it within the constant extents after the
        # last symbolic row axis, or, where the innermost row axis is symbolic, split that
        # axis alone (a predicated tail) instead of fusing the rows.
        sym_rows = [i for i, sym in enumerate(symbolic[: n_spatial - 1]) if sym]
        split_last_row = bool(sym_rows) and sym_rows[-1] == n_spatial - 2
        plan_rows = row_extents[sym_rows[-1] + 1 :] if sym_rows else row_extents
        c_ext = extents[n_spatial - 1]
        vec = largest_divisor(c_ext, lanes, powers_of_two=True)
        rt, ct = register_tile(
            plan_rows or [NOMINAL_EXTENT], c_ext // vec, self.max_accumulators(lanes),
            l2_panel_bytes(extents, n_spatial, vec, dtype_bits),
        )  # fmt: skip
        bn = ct * vec
        padded = False
        if split_last_row or symbolic[n_spatial - 1]:
            # A symbolic row count or column count: pad it to whole tiles (a copy of the
            # operand, one pass over it next to the contraction), so no predicate sits in the
            # unrolled, vectorised register tile, where it kept LLVM from holding the
            # accumulators in registers (2.5x slower; 24x for a predicated vector column).
            # The copy back is the first consumer, inlined into the epilogue below, which
            # writes only the real rows and columns.
            pad = [1] * len(loops)
            if split_last_row:
                pad[n_spatial - 2] = rt
            if symbolic[n_spatial - 1]:
                pad[n_spatial - 1] = bn
            try:
                sch.pad_einsum(block, pad)
            except REFUSED:
                pass
            else:
                padded = True
                blocks = sch.get_child_blocks(root)
                stmt = sch.get(block)
                operands = _multiply_add_operands(stmt)
                c_var = stmt.iter_vars[n_spatial - 1].var
        packed = self._pack_weight(sch, block, stmt, func, operands, c_var, n_spatial, bn)

        # Epilogue: collapse the elementwise chain after the contraction into its last block,
        # then fold that block into the accumulator write-back (reverse_compute_inline).
        at = [sch.get(b).name_hint for b in blocks].index(sch.get(block).name_hint)
        producers = [sch.get(b).name_hint for b in blocks[:at]]
        consumers = list(blocks[at + 1 :])
        for b in consumers[:-1]:
            sch.compute_inline(b)
        epilogue = consumers[-1] if consumers else None
        # A producer that only copies (the zero-width "pad" of a 1x1 conv) is folded into the
        # operand read; a real pad stays separate (an if_then_else in the inner loop is slower).
        for name in list(producers):
            pb = sch.get_sblock(name)
            if _is_copy(sch.get(pb)):
                try:
                    sch.compute_inline(pb)
                    producers.remove(name)
                except REFUSED:
                    pass

        loops = sch.get_loops(block)
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        # A symbolic reduction (attention's probabilities @ V over the sequence) is not
        # blocked: the slice would need a predicated tail in the innermost loop.
        kc = None if any(symbolic[n_spatial:]) else k_block(extents, n_spatial, rt, bn, dtype_bits)
        if kc:
            rows = 1
            for e in row_extents:
                rows *= e
            # A symbolic row count keeps one M-block (its tail is padded to rt, not to a block).
            blocks = 1 if sym_rows else row_blocks(rows, rt, extents[-1], c_ext // bn, dtype_bits,
                                                    row_extents)  # fmt: skip
            # Symbolic rows: split only the innermost row axis where the tile fits in it (padded
            # to whole tiles, or a constant multiple of rt), the other row axes loops of their
            # own, so no index of the tile divides by a symbolic extent.
            inner_fits = padded if split_last_row else extents[n_spatial - 2] % rt == 0
            split_inner = bool(sym_rows) and n_spatial > 2 and inner_fits
            self._schedule_k_blocked(
                sch, block, spatial, reduce, epilogue, rt, ct, vec, kc, blocks, split_inner,
                parallel,
            )  # fmt: skip
            for name in producers:
                schedule_injective_block(sch, sch.get_sblock(name), lanes)
            self.last_match = ContractionInfo(
                sch.get(block).name_hint, shown[:n_spatial], shown[n_spatial:], (rt, ct, vec),
                packed, kc, blocks,
            )  # fmt: skip
            return sch
        c_o, c_t, c_v = sch.split(spatial[-1], [None, ct, vec])
        if n_spatial >= 2 and split_last_row:
            r_o, r_i = sch.split(spatial[-2], [None, rt])
            outer, inner = [c_o, *spatial[:-2], r_o], [r_i, c_t, c_v]
        elif n_spatial >= 2 and sym_rows:
            # A symbolic outer row axis (attention's batch or batch * heads): it goes first in
            # the parallel loop and stays out of the tile, and the tile splits only the
            # constant rows after it (the innermost one alone where the tile fits in it), so
            # no index divides by a symbolic extent or decomposes an unrolled loop variable.
            # Fused with the tiled rows, or inside the panel loop, every accumulator index was
            # an int64 div/mod by a symbolic extent and LLVM kept the tile in memory.
            lead = spatial[: sym_rows[-1] + 1]
            const_rows = spatial[sym_rows[-1] + 1 : -1]
            if extents[n_spatial - 2] % rt == 0:
                r_o, r_i = sch.split(const_rows[-1], [None, rt])
                outer = [*lead, c_o, *const_rows[:-1], r_o]
            else:
                rows = sch.fuse(*const_rows) if len(const_rows) > 1 else const_rows[0]
                r_o, r_i = sch.split(rows, [None, rt])
                outer = [*lead, c_o, r_o]
            inner = [r_i, c_t, c_v]
        elif n_spatial >= 2:
            rows = sch.fuse(*spatial[:-1]) if n_spatial > 2 else spatial[0]
            r_o, r_i = sch.split(rows, [None, rt])
            # Output-channel tiles outermost: one packed weight panel stays in cache while
            # every row tile of the output streams past it.
            outer, inner = [c_o, r_o], [r_i, c_t, c_v]
        else:
            outer, inner = [c_o], [c_t, c_v]
        sch.reorder(*outer, *reduce, *inner)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if parallel:
            sch.parallel(fused)

        acc = sch.cache_write(block, 0, "local")
        # With padded tiles the epilogue covers fewer rows than the tile: it stays a loop nest
        # of its own (reverse_compute_inline would let the tile write past the real output).
        separate = sch.get(epilogue).name_hint if padded and epilogue is not None else None
        if epilogue is not None and not padded:
            sch.reverse_compute_inline(epilogue)
        sch.reverse_compute_at(acc, fused)
        wb_loops = sch.get_loops(acc)[1:]
        if wb_loops:  # none when the whole tile is one element
            wb_inner = sch.fuse(*wb_loops) if len(wb_loops) > 1 else wb_loops[0]
            wb_ext = const_extent(sch, wb_inner)
            if wb_ext and wb_ext % vec == 0 and vec > 1:
                _, wv = sch.split(wb_inner, [None, vec])
                sch.vectorize(wv)

        for lp in inner[:-1]:
            sch.unroll(lp)
        sch.vectorize(inner[-1])
        init = sch.decompose_reduction(block, reduce[0])
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])

        for name in producers + ([separate] if separate else []):
            schedule_injective_block(sch, sch.get_sblock(name), lanes)
        self.last_match = ContractionInfo(
            sch.get(block).name_hint, shown[:n_spatial], shown[n_spatial:], (rt, ct, vec), packed
        )
        return sch

    @staticmethod
    def _schedule_k_blocked(
        sch, block, spatial, reduce, epilogue, rt, ct, vec, kc, blocks=1, split_inner=False,
        parallel=True,
    ):  # fmt: skip
        """GEMM blocking for long reductions: the panel loop ``c_o`` and ``blocks`` M-blocks of
        rows outermost (parallel pairs, :func:`.cpu_blocking.row_blocks`), then ``kc``-deep
        slices of the reduction, then row tiles, so a ``kc x bn`` slice of the packed weight
        stays in L1 while every row tile of the block passes it, and the block's activation
        rows stay in L2 across slices. The register tile is loaded from and stored to the
        output panel once per slice (LLVM promotes it across ``k_i``)."""
        c_o, c_t, c_v = sch.split(spatial[-1], [None, ct, vec])
        lead = []
        if split_inner:  # symbolic rows: the outer row axes stay loops, outside the tile
            lead, rows = list(spatial[:-2]), spatial[-2]
        else:
            rows = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        if blocks > 1:
            r_b, r_o, r_i = sch.split(rows, [blocks, None, rt])
            outer = [c_o, r_b]
        else:
            r_o, r_i = sch.split(rows, [None, rt])
            outer = [c_o]
        k_o, k_i = sch.split(reduce[-1], [None, kc])
        sch.reorder(*outer, k_o, *lead, r_o, *reduce[:-1], k_i, r_i, c_t, c_v)
        par = sch.fuse(*outer) if len(outer) > 1 else c_o
        if parallel:
            sch.parallel(par)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, par)
            e_loops = sch.get_loops(epilogue)
            inner_ext = const_extent(sch, e_loops[-1])
            if inner_ext and inner_ext % vec == 0 and vec > 1:
                _, ev = sch.split(e_loops[-1], [None, vec])
                sch.vectorize(ev)
        sch.unroll(r_i)
        sch.unroll(c_t)
        sch.vectorize(c_v)
        init = sch.decompose_reduction(block, k_o)
        sch.vectorize(sch.get_loops(init)[-1])

    def max_accumulators(self, lanes: int) -> int:
        # x86: 32 vector registers with AVX-512, 16 below; keep a few for operands.
        return 24 if lanes >= 16 else 12

    def _pack_weight(self, sch, block, stmt, func, operands, c_var, n_spatial, bn):
        """Repack the weight operand ``W[r..., c]`` to ``W[c // bn, r..., c % bn]``.

        Only for buffers Relax marked ``layout_free_buffers`` (model weights): the rewrite block
        is annotated like MetaSchedule's ``RewriteLayout`` output, so ``SplitLayoutRewritePreproc``
        moves it to its own PrimFunc and ``LiftTransformParams`` runs it once at build time.
        The kernel then reads one contiguous ``K x bn`` panel per output-channel tile.
        """
        free = func.attrs.get("layout_free_buffers") if func.attrs else None
        if free is None or bn <= 1:
            return None
        free_names = {func.params[int(i)].name for i in free}
        reduce_vars = [iv.var for iv in stmt.iter_vars[n_spatial:]]
        spatial_vars = [iv.var for iv in stmt.iter_vars[: n_spatial - 1]]
        for op in operands:
            idx = list(op.indices)
            if op.source.name not in free_names or not idx[-1].same_as(c_var):
                continue
            if any(_uses(i, v) for i in idx[:-1] for v in spatial_vars + [c_var]):
                continue
            if not all(any(_uses(i, v) for v in reduce_vars) or isinstance(i, tirx.IntImm)
                       for i in idx[:-1]):  # fmt: skip
                continue
            read_idx = [r.source.name for r in stmt.reads].index(op.source.name)
            pre = sch.cache_read(block, read_idx, "global")
            sch.transform_layout(
                block, ("read", read_idx), lambda *ax: (ax[-1] // bn, *ax[:-1], ax[-1] % bn)
            )
            sch.annotate(pre, "meta_schedule.layout_rewrite_preproc", True)
            return f"[{sch.get(block).reads[read_idx].source.name}: c/{bn}, ..., {bn}]"
        return None
