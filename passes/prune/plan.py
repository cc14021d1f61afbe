"""PlanRemoval: turn "remove these indices of these groups" into per-axis kept positions.

The plan is frontend-independent: for every (value, axis) that changes it holds the kept
positions (sorted), and the new shape of every value. Writers (``graphprune.frontends.torch.graph_module``,
``graphprune.frontends.onnx.writeback``) read only the plan and the graph. Runs after ``BuildCoupling``
(and usually ``PruneChannels``, which chooses the indices); :class:`PlanRemoval` is the pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from graphprune.ir import PruneGraph
from graphprune.ir.errors import ConfigError
from graphprune.ir.plan import RemovalPlan
from graphprune.passes.base import PassResult
from graphprune.passes.coupling import build_coupling


def plan_removal(pg: PruneGraph, removal: Mapping[int, Iterable[int]]) -> RemovalPlan:
    """Plan the removal of ``removal[group_id]`` indices from each group.

    Raises :class:`ConfigError` for a frozen group (with its reason), an index out of range, or a
    request that would remove every index of a group.
    """
    cp = build_coupling(pg)
    keep: dict[int, np.ndarray] = {}
    removed: dict[int, np.ndarray] = {}
    for gid, idx in removal.items():
        if not 0 <= gid < len(cp.groups):
            raise ConfigError(f"no group {gid}: {pg.name} has groups 0..{len(cp.groups) - 1}")
        g = cp.groups[gid]
        idx = np.unique(np.asarray(list(idx), dtype=np.int64))
        if idx.size == 0:
            continue
        if g.frozen_reason is not None:
            raise ConfigError(f"group {gid} ({g.describe()}) is frozen: {g.frozen_reason}")
        if idx.min() < 0 or idx.max() >= g.size:
            raise ConfigError(f"group {gid} has indices 0..{g.size - 1}; got {idx.tolist()}")
        kept = np.setdiff1d(np.arange(g.size), idx)
        if kept.size == 0:
            raise ConfigError(f"removing all {g.size} indices of group {gid} ({g.describe()}) "
                              "would delete the layer; keep at least one")  # fmt: skip
        keep[cp.table.find(g.var)] = kept
        removed[gid] = idx
    plan = RemovalPlan(cp, keep, removed=removed)
    for (v, a), var in cp.axis_var.items():
        k = cp.kept(var, keep)
        if k is not None:
            plan.axis_keep[(v, a)] = k
    for v in pg.values():
        shape = pg.value(v).shape
        if shape is None:
            continue
        new = tuple(len(plan.axis_keep[(v, a)]) if (v, a) in plan.axis_keep else d
                    for a, d in enumerate(shape))  # fmt: skip
        if new != tuple(shape):
            plan.new_shapes[v] = new
    for op, attrs in cp.op_vars.items():
        for attr, var in attrs.items():
            k = cp.kept(var, keep)
            plan.op_sizes[(op, attr)] = (
                int(cp.table.size[cp.table.find(var)]) if k is None else len(k))
    return plan


@dataclass(frozen=True)
class PlanRemoval:
    """:func:`plan_removal` as a pass: ``run(pg, removal={group id: indices})``.

    Requires ``BuildCoupling``; ``changed`` is True when the plan changes a shape. The report
    counts the groups cut and the values whose shape changes.
    """

    name: str = "PlanRemoval"
    requires: tuple[str, ...] = ("BuildCoupling",)

    def run(self, graph: PruneGraph, *,
            removal: Mapping[int, Iterable[int]]) -> PassResult[RemovalPlan]:  # fmt: skip
        plan = plan_removal(graph, removal)
        report = {"groups": len(plan.removed), "values_resized": len(plan.new_shapes)}
        return PassResult(plan, bool(plan.new_shapes), report)
