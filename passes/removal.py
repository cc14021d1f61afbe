"""PlanRemoval: turn "remove these indices of these groups" into per-axis kept positions.

The plan is frontend-independent: for every (value, axis) that changes it holds the kept
positions (sorted), and the new shape of every value. Writers (``graphprune.writeback_torch``,
``graphprune.writeback_onnx``) read only the plan and the graph. Runs after ``BuildCoupling``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from graphprune.errors import ConfigError
from graphprune.ir import PruneGraph
from graphprune.passes.coupling import Coupling


@dataclass
class RemovalPlan:
    """Kept positions per changed axis and the new shape of every value."""

    coupling: Coupling
    keep: dict[int, np.ndarray]
    axis_keep: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    new_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    removed: dict[int, np.ndarray] = field(default_factory=dict)

    def kept(self, value: str, axis: int) -> np.ndarray | None:
        return self.axis_keep.get((value, axis))

    def var_size(self, var: int) -> int:
        k = self.coupling.kept(var, self.keep)
        return int(self.coupling.table.size[self.coupling.table.find(var)]) if k is None else len(k)

    def changed(self, value: str) -> bool:
        return value in self.new_shapes


def plan_removal(pg: PruneGraph, removal: Mapping[int, Iterable[int]]) -> RemovalPlan:
    """Plan the removal of ``removal[group_id]`` indices from each group.

    Raises :class:`ConfigError` for a frozen group (with its reason), an index out of range, or a
    request that would remove every index of a group.
    """
    cp = pg.coupling()
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
    return plan


def slice_array(arr: np.ndarray, value: str, plan: RemovalPlan) -> np.ndarray:
    """``arr`` (the data of ``value``) with every changed axis sliced to its kept positions."""
    for a in range(arr.ndim):
        k = plan.kept(value, a)
        if k is not None:
            arr = np.take(arr, k, axis=a)
    return arr
