"""BuildCoupling: which channels, neurons and heads must be removed together.

Every tensor axis gets a *dimension variable* in a
:class:`~graphprune.passes.coupling.table.VarTable`. Each op's rule (one registry,
:data:`~graphprune.passes.coupling.rules.COUPLING_RULES`, keyed by IR op kind) states how the
variables of its inputs, parameters and outputs relate: the same index space, a row-major
factorisation (C → heads × head_dim) or a concatenation (cat, split, slice).

After every op ran, the *leaves* (variables with no refinement) are the prunable index spaces:
each leaf with at least one trainable parameter member is a
:class:`~graphprune.passes.coupling.groups.Group`. Removing index ``i`` of a leaf removes, from
every member axis, the positions whose leaf-coordinate is ``i``: whole heads, whole conv groups
and the same channel in every chunk fall out of the same arithmetic.

A variable is *frozen* (never pruned, with ``frozen_reason``) when it reaches a model input or
output, when an op creates it (pool sizes, expand counts, token vocabularies), when it is indexed
(``select``), when it is an axis of an integer constant or of a gather's indices (positions,
not channels: a relative-position index over window offsets), or when it passes through an op
without a rule. Reductions over a variable (mean in LayerNorm/RMSNorm, softmax, sum) are
recorded in ``Group.reductions``.

Runs after capture, before any planning pass (``PruneChannels``, ``PlanRemoval``); reads only the
:class:`~graphprune.ir.PruneGraph` and caches its result on it under ``"coupling"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphprune.ir import CouplingError, PruneGraph
from graphprune.passes.base import PassResult

# The rule families register themselves in COUPLING_RULES when imported.
from graphprune.passes.coupling import rules_attention, rules_contraction, rules_shape  # noqa: F401
from graphprune.passes.coupling.groups import Coupling, Group, Member
from graphprune.passes.coupling.rules import RuleContext, rule_for
from graphprune.passes.coupling.table import Axis, VarTable


@dataclass(frozen=True)
class BuildCoupling:
    """The coupling analysis as a pass: ``run(pg)`` gives ``PassResult(Coupling)``.

    Requires nothing; ``changed`` is always False (an analysis). The report counts the groups
    and the prunable ones.
    """

    name: str = "BuildCoupling"
    requires: tuple[str, ...] = ()

    def run(self, graph: PruneGraph, **config: Any) -> PassResult[Coupling]:
        if config:
            raise TypeError(f"BuildCoupling takes no options; got {sorted(config)}")
        cp = build_coupling(graph)
        prunable = sum(g.prunable for g in cp.groups)
        return PassResult(cp, False, {"groups": len(cp.groups), "prunable": prunable})


def build_coupling(pg: PruneGraph) -> Coupling:
    """Compute coupled channel groups of ``pg`` (cached on the graph).

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pg = gp.capture(m, (torch.randn(2, 4),))
    >>> from graphprune.passes.coupling import build_coupling
    >>> [g.size for g in build_coupling(pg).groups if g.prunable]
    [8]
    """
    return pg.cached("coupling", analyse_coupling)


def analyse_coupling(pg: PruneGraph) -> Coupling:
    """:func:`build_coupling` without the cache: runs the whole analysis every time (benchmarks)."""
    t = VarTable()
    axis_var: dict[Axis, int] = {}
    for v in pg.values():
        val = pg.value(v)
        for a, d in enumerate(val.shape or ()):
            axis_var[(v, a)] = t.new(d)
    ctx = RuleContext(pg, t, axis_var)
    for o in pg.ops():
        ctx.op, ctx.bound = o, set()
        try:
            rule_for(pg.op(o).kind)(ctx)
        except CouplingError as e:
            raise CouplingError(_contradiction(pg, o, e)) from e
        for out in pg.op_outputs(o):
            for a in range(len(pg.value(out).shape or ())):
                if (out, a) not in ctx.bound:
                    t.freeze(axis_var[(out, a)], f"size set by {ctx.where}")
    for v in pg.inputs:
        for a in range(len(pg.value(v).shape or ())):
            t.freeze(axis_var[(v, a)], f"reaches model input {v!r}")
    for v in pg.outputs:
        for a in range(len(pg.value(v).shape or ())):
            t.freeze(axis_var[(v, a)], f"reaches model output {v!r}")
    params = set(pg.params())
    for v in params:
        if _is_integer(pg.value(v).dtype):
            # An integer constant is an index table or a shape, never weights: its positions
            # are geometry (a relative-position index over window positions), not channels.
            for a in range(len(pg.value(v).shape or ())):
                t.freeze(axis_var[(v, a)], f"integer constant {v!r} (an index, not weights)")
    for va in [va for va in axis_var if va[0] in params and va not in ctx.all_bound]:
        t.freeze(axis_var[va], "not a channel axis of any op that reads this parameter")
    cp = Coupling(pg, t, axis_var, ctx.op_vars)
    _collect_groups(cp)
    return cp


def _is_integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def _contradiction(pg: PruneGraph, o: str, e: CouplingError) -> str:
    op = pg.op(o)

    def shapes(vs: list) -> str:
        return ", ".join(f"{v} {list(pg.value(v).shape or ())}" for v in vs if v is not None)

    return (f"{pg.name}: the coupling rule of op {o!r} ({op.kind}, {op.source}) contradicts the "
            f"captured shapes: {e}. Inputs: {shapes(pg.op_inputs(o))}; outputs: "
            f"{shapes(pg.op_outputs(o))}. The op's attributes {op.attrs} or the shapes the "
            "frontend recorded are wrong for this op; check them (onnx.shape_inference for an "
            "ONNX model) or report the op.")  # fmt: skip


def _collect_groups(cp: Coupling) -> None:
    t, pg = cp.table, cp.pg
    # Freezing a variable freezes everything it refines into.
    frozen: dict[int, list[str]] = {}

    def push(r: int, reasons: list[str]) -> None:
        r = t.find(r)
        cur = frozen.setdefault(r, [])
        new = [x for x in reasons if x not in cur]
        if not new and cur:
            return
        cur.extend(new)
        if r in t.parts:
            for p in t.parts[r][1]:
                push(p, reasons)

    reductions: dict[int, list[str]] = {}

    def push_red(r: int, notes: list[str]) -> None:
        r = t.find(r)
        cur = reductions.setdefault(r, [])
        new = [x for x in notes if x not in cur]
        cur.extend(new)
        if new and r in t.parts:
            for p in t.parts[r][1]:
                push_red(p, notes)

    for r, reasons in list(t.frozen.items()):
        if t.find(r) == r:
            push(r, reasons)
    for r, notes in list(t.reductions.items()):
        if t.find(r) == r:
            push_red(r, notes)

    by_leaf: dict[int, list[Member]] = {}
    for (v, a), var in cp.axis_var.items():
        leaves = cp.leaves(var)
        val = pg.value(v)
        for leaf in leaves:
            block = cp.block(var, leaf)
            by_leaf.setdefault(leaf, []).append(
                Member(v, a, val.param if val.role == "param" else None, block))
    groups = []
    for leaf, members in by_leaf.items():
        if not any(m.param and pg.value(m.value).trainable
                   and pg.value(m.value).dtype.startswith(("float", "bfloat")) for m in members):
            continue  # only buffers or integer tables (position ids): nothing to prune
        reasons = frozen.get(leaf)
        if reasons and all(r.startswith("not a channel axis") for r in reasons):
            continue  # kernel and other non-channel axes: not a group at all
        g = Group(len(groups), leaf, t.size[leaf], members,
                  "; ".join(reasons[:3]) if reasons else None, reductions.get(leaf, []))
        if g.size <= 1 and g.frozen_reason is None:
            g.frozen_reason = "a single channel cannot be removed"
        groups.append(g)
    groups.sort(key=lambda g: (g.frozen_reason is not None, _first_param_pos(pg, g)))
    for i, g in enumerate(groups):
        g.id = i
    cp.groups = groups


def _first_param_pos(pg: PruneGraph, g: Group) -> int:
    order = pg.cached("param_order", lambda g: {p: i for i, p in enumerate(g.params())})
    return min((order.get(m.value, 1 << 30) for m in g.members if m.param), default=1 << 30)