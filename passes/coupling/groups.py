"""The result of BuildCoupling: :class:`Coupling`, its :class:`Group` s and their :class:`Member` s.

A group is one *leaf* variable of the :class:`~graphprune.passes.coupling.table.VarTable` (an index
space with no further refinement) that at least one trainable parameter axis maps onto. Removing
index ``i`` of the group removes, from every member axis, the positions whose leaf coordinate is
``i``; :meth:`Coupling.kept`, :meth:`Coupling.coords` and :meth:`Coupling.block` do that index
arithmetic for the planning and scoring passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphprune.ir import PruneGraph
from graphprune.passes.coupling.table import Axis, VarTable


@dataclass
class Member:
    """One axis in a group: ``value`` (a parameter when ``param`` is set), ``axis``, and
    ``block``: how many positions along that axis one group index covers."""

    value: str
    axis: int
    param: str | None
    block: int


@dataclass
class Group:
    """A set of coupled channels: remove index i of the group and every member loses its
    positions at coordinate i. ``frozen_reason`` is None when the group may be pruned."""

    id: int
    var: int
    size: int
    members: list[Member]
    frozen_reason: str | None = None
    reductions: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None and self.size > 1

    @property
    def exact(self) -> bool:
        """True when removing dead channels of this group leaves the outputs unchanged."""
        return not self.reductions

    @property
    def params(self) -> list[Member]:
        return [m for m in self.members if m.param is not None]

    @property
    def granularity(self) -> int:
        """Positions removed from the first parameter member per group index (1: channel)."""
        ps = self.params
        return ps[0].block if ps else 1

    def describe(self) -> str:
        names = sorted({f"{m.param}[{m.axis}]" for m in self.params})
        more = f" +{len(names) - 4}" if len(names) > 4 else ""
        return ", ".join(names[:4]) + more


class Coupling:
    """Result of :func:`build_coupling`: the variable table, the axis→variable map and groups."""

    def __init__(self, pg: PruneGraph, table: VarTable, axis_var: dict[Axis, int],
                 op_vars: dict[str, dict[str, int]]):  # fmt: skip
        self.pg = pg
        self.table = table
        self.axis_var = axis_var
        self.op_vars = op_vars
        self.groups: list[Group] = []

    # -- index arithmetic ------------------------------------------------------------------
    def kept(self, var: int, keep: dict[int, np.ndarray]) -> np.ndarray | None:
        """Kept positions along ``var`` given kept indices per leaf (None: nothing removed)."""
        t = self.table
        r = t.find(var)
        if r in keep:
            return keep[r]
        sub = t.parts.get(r)
        if not sub:
            return None
        mode, parts = sub
        kids = [self.kept(p, keep) for p in parts]
        if all(k is None for k in kids):
            return None
        kids = [np.arange(t.size[t.find(p)]) if k is None else k for p, k in zip(parts, kids)]
        if mode == "cat":
            offs = np.cumsum([0] + [t.size[t.find(p)] for p in parts[:-1]])
            return np.concatenate([k + o for k, o in zip(kids, offs)])
        idx = np.zeros(1, dtype=np.int64)
        for p, k in zip(parts, kids):
            idx = (idx[:, None] * t.size[t.find(p)] + k[None, :]).reshape(-1)
        return idx

    def leaves(self, var: int) -> list[int]:
        t = self.table
        r = t.find(var)
        sub = t.parts.get(r)
        if not sub:
            return [r]
        return [leaf for p in sub[1] for leaf in self.leaves(p)]

    def coords(self, var: int, leaf: int) -> np.ndarray:
        """For each position along ``var``: the index of ``leaf`` it belongs to (-1: none)."""
        t = self.table
        r = t.find(var)
        if r == leaf:
            return np.arange(t.size[r])
        sub = t.parts.get(r)
        if not sub:
            return np.full(t.size[r], -1)
        mode, parts = sub
        kids = [self.coords(p, leaf) if leaf in self.leaves(p) else None for p in parts]
        if mode == "cat":
            return np.concatenate([k if k is not None else np.full(t.size[t.find(p)], -1)
                                   for p, k in zip(parts, kids)])  # fmt: skip
        out = np.full(1, -1)
        for p, k in zip(parts, kids):
            n = t.size[t.find(p)]
            k = np.full(n, -1) if k is None else k
            out = np.maximum(out[:, None], k[None, :]).reshape(-1)
        return out

    def block(self, var: int, leaf: int) -> int:
        """Positions along ``var`` that one index of ``leaf`` covers."""
        t = self.table
        r = t.find(var)
        if r == leaf:
            return 1
        mode, parts = t.parts[r]
        out = 1
        for p in parts:
            if leaf in self.leaves(p):
                out *= self.block(p, leaf)
            elif mode == "prod":
                out *= t.size[t.find(p)]
        return out

    def group(self, gid: int) -> Group:
        return self.groups[gid]