"""Peel the tail of vector loops over a symbolic extent: whole vectors, then a scalar tail.

A schedule rule that splits a loop of symbolic extent ``n`` into ``(ceil(n / lanes), lanes)``
gets a predicate ``ko * lanes + ki < n`` on its block, and TVM 0.27 cannot turn that into
whole vectors plus a tail: ``LoopPartition`` does not peel a symbolic-extent tail (the vector
loop is scalarised), ``Schedule.loop_partition`` refuses symbolic extents, buffer-level
predication emits an ill-typed ``llvm.get.active.lane.mask`` for int64 indices, and
``compute_at`` drops the predicate of a block it moves (the partial accumulators of a row
reduction lose theirs). This module does the peel on the scheduled block-form PrimFunc:

* the rule marks the outer loop ``ko`` with :func:`mark_tail` (annotation :data:`PEEL`, the
  value indexes a list holding ``n``, the extent before the split);
* :func:`peel_tails` replaces each marked loop by ``for ko in range(n // lanes)`` over the body
  with every block predicate dropped (provably true there) and the vector loop kept, followed by
  ``for ko in range(n // lanes, ceil(n / lanes))`` over a serial copy of the body whose blocks
  carry ``ko * lanes + ki < n`` (re-added where ``compute_at`` had dropped it).

The result is still a block-form PrimFunc (the same blocks twice under different loops), which
the standard lowering takes as is. Used by :class:`.cpu_reductions.RowReduction` for rows of
symbolic length (attention's softmax over a dynamic key length).
"""

from __future__ import annotations

__all__ = ["PEEL", "mark_tail", "peel_tails"]

PEEL = "graphprune.peel_tail"


def mark_tail(sch, outer, extent, extents: list) -> None:
    """Mark ``outer`` (the outer loop of a ``split(k, [None, lanes])`` of a loop of symbolic
    ``extent``; the inner loop, vectorised, must be its only child loop) for :func:`peel_tails`,
    which takes ``extents``. (An annotation cannot hold the extent itself: the schedule reads a
    PrimExpr annotation as one of its random variables.)"""
    sch.annotate(outer, PEEL, len(extents))
    extents.append(extent)


def _rebuild(stmt, fn):
    """``stmt`` with ``fn`` applied to every ``For`` (post-order); other nodes rebuilt around
    their new children. Covers what block-form schedules contain."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_rebuild(s, fn) for s in stmt.seq])
    if isinstance(stmt, tirx.For):
        body = _rebuild(stmt.body, fn)
        loop = tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                        stmt.thread_binding, stmt.annotations)  # fmt: skip
        return fn(loop)
    if isinstance(stmt, s_tir.SBlockRealize):
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, _rebuild(stmt.block, fn))
    if isinstance(stmt, s_tir.SBlock):
        b = stmt
        return s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, _rebuild(b.body, fn),
                            b.init, b.alloc_buffers, b.match_buffers, b.annotations)  # fmt: skip
    if isinstance(stmt, tirx.IfThenElse):
        other = _rebuild(stmt.else_case, fn) if stmt.else_case is not None else None
        return tirx.IfThenElse(stmt.condition, _rebuild(stmt.then_case, fn), other)
    return stmt


def _copy_nest(stmt, predicate, serial: bool):
    """``stmt`` (a loop nest ending in one block) with that block's ``predicate`` replaced and,
    with ``serial``, vectorised loops made serial."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        kind = tirx.ForKind.SERIAL if serial else stmt.kind
        body = _copy_nest(stmt.body, predicate, serial)
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, kind, body, stmt.thread_binding,
                        stmt.annotations)  # fmt: skip
    if isinstance(stmt, s_tir.SBlockRealize):
        return s_tir.SBlockRealize(stmt.iter_values, predicate, stmt.block)
    raise TypeError(f"peel_tails: expected a loop nest ending in one block, got {type(stmt)}")


def _fresh_vars(stmt, defined):
    """``stmt`` with each var of ``defined`` (its loop and block iter vars) replaced by a new
    one of the same name and type: TIR defines a var once, and the tail repeats the nest."""
    from tvm import tirx
    from tvm_ffi.structural import structural_map

    fresh = [(v, tirx.Var(v.name, v.ty)) for v in defined]

    def rename(v):
        for old, new in fresh:
            if old.same_as(v):
                return new
        return v

    return structural_map(stmt, [(tirx.Var, rename)])


def _defined_vars(stmt) -> list:
    """The loop vars and block iter vars a loop nest ending in one block defines."""
    from tvm import s_tir, tirx

    out = []
    while isinstance(stmt, tirx.For):
        out.append(stmt.loop_var)
        stmt = stmt.body
    if isinstance(stmt, s_tir.SBlockRealize):
        out += [iv.var for iv in stmt.block.iter_vars]
    return out


def _peel(loop, extents):
    import tvm
    from tvm import tirx

    if PEEL not in loop.annotations:
        return loop
    n = extents[int(loop.annotations[PEEL])]
    inner = loop.body
    if not isinstance(inner, tirx.For) or not isinstance(inner.extent, tirx.IntImm):
        raise TypeError("peel_tails: the marked loop's body must be the constant vector loop")
    lanes = int(inner.extent)
    ko, ki = loop.loop_var, inner.loop_var
    whole = n // lanes
    annotations = {k: v for k, v in loop.annotations.items() if k != PEEL}
    true = tvm.tirx.const(True, "bool")
    main = tirx.For(ko, tvm.tirx.const(0, "int64"), whole, loop.kind,
                    _copy_nest(inner, true, False), None, annotations)  # fmt: skip
    tail = tirx.For(ko, whole, (n + lanes - 1) // lanes - whole, tirx.ForKind.SERIAL,
                    _copy_nest(inner, ko * lanes + ki < n, True))  # fmt: skip
    return tirx.SeqStmt([main, _fresh_vars(tail, _defined_vars(tail))])


def peel_tails(func, extents: list):
    """``func`` with every loop marked by :func:`mark_tail` split into whole vectors and a
    scalar tail (see the module docstring)."""
    return func.with_body(_rebuild(func.body, lambda loop: _peel(loop, extents)))
