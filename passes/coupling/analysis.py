"""BuildCoupling: which channels, neurons and heads must be removed together.

Every tensor axis gets a *dimension variable*. Op rules (one registry, ``COUPLING_RULES``, keyed
by normalised op kind) state how the variables of an op's inputs, parameters and outputs relate:

* ``tie``: the same index space (elementwise ops, a Linear's in-features and its input's last axis);
* ``refine(v, "prod", parts)``: ``v`` factorises row-major into ``parts`` (C → heads × head_dim in
  a reshape, C → groups × per-group in a grouped conv, C → chunks × size in ``chunk``);
* ``refine(v, "cat", parts)``: ``v`` is the concatenation of ``parts`` (cat, split, slice).

Variables are kept in a union-find; refinements are reconciled when two refined variables meet
(common refinement of their boundaries, or a frozen conflict with a reason). After every op ran,
the *leaves* (variables with no refinement) are the prunable index spaces: each leaf with at
least one parameter member is a :class:`Group`. Removing index ``i`` of a leaf removes, from every
member axis, the positions whose leaf-coordinate is ``i`` — whole heads, whole conv groups and the
same channel in every chunk fall out of the same arithmetic.

A variable is *frozen* (never pruned, with ``frozen_reason``) when it reaches a model input or
output, when an op creates it (pool sizes, expand counts, token vocabularies), when it is indexed
(``select``) or when it passes through an op without a rule. Reductions over a variable (mean in
LayerNorm/RMSNorm, softmax, sum) are recorded in ``Group.reductions``: removing such channels
changes the statistics, so the result is an approximation the report states.

Runs after capture, before any planning pass; reads only the :class:`~graphprune.ir.PruneGraph`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphprune.ir import PruneGraph

Axis = tuple[str, int]  # (value id, axis)


class VarTable:
    """Union-find over dimension variables with row-major/concat refinements."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.parts: dict[int, tuple[str, list[int]]] = {}
        self.frozen: dict[int, list[str]] = {}
        self.reductions: dict[int, list[str]] = {}

    def new(self, size: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        v = len(self.parent) - 1
        if frozen:
            self.frozen[v] = [frozen]
        return v

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:
            self.parent[v], v = root, self.parent[v]
        return root

    def freeze(self, v: int, reason: str) -> None:
        r = self.find(v)
        lst = self.frozen.setdefault(r, [])
        if reason not in lst and len(lst) < 8:
            lst.append(reason)

    def reduce(self, v: int, note: str) -> None:
        r = self.find(v)
        lst = self.reductions.setdefault(r, [])
        if note not in lst:
            lst.append(note)

    def unify(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            reason = f"sizes {self.size[ra]} and {self.size[rb]} meet"
            self.freeze(ra, reason)
            self.freeze(rb, reason)
            return
        pa, pb = self.parts.pop(ra, None), self.parts.pop(rb, None)
        self.parent[rb] = ra
        for table in (self.frozen, self.reductions):
            if rb in table:
                for x in table.pop(rb):
                    if x not in table.setdefault(ra, []):
                        table[ra].append(x)
        if pa and pb:
            self.parts[ra] = pa
            self._reconcile(ra, pa, pb)
        elif pa or pb:
            self.parts[ra] = pa or pb

    def refine(self, v: int, mode: str, parts: list[int]) -> None:
        """State ``v == mode(parts)`` ("prod": row-major product, "cat": concatenation)."""
        if mode == "prod":
            parts = [p for p in parts if self.size[self.find(p)] != 1]
        else:
            parts = [p for p in parts if self.size[self.find(p)] != 0]
        if len(parts) == 1:
            self.unify(v, parts[0])
            return
        if not parts:
            return
        r = self.find(v)
        total = math.prod(self.size[self.find(p)] for p in parts) if mode == "prod" else sum(
            self.size[self.find(p)] for p in parts)
        if total != self.size[r]:
            self.freeze(r, f"refinement of size {total} does not match {self.size[r]}")
            return
        if any(self.find(p) == r for p in parts):
            self.freeze(r, "axis refines into itself")
            return
        old = self.parts.get(r)
        if old is None:
            self.parts[r] = (mode, list(parts))
        else:
            self._reconcile(r, old, (mode, list(parts)))

    def _reconcile(self, r: int, a: tuple[str, list[int]], b: tuple[str, list[int]]) -> None:
        """Make two refinements of the same variable agree (or freeze it, saying why)."""
        (ma, pa), (mb, pb) = a, b
        if ma != mb:
            # cat of k equal parts == prod(k, part): tie each part to the inner factor; the
            # "which part" factor cannot be pruned (it would remove a whole cat input).
            cat, prod = (pa, pb) if ma == "cat" else (pb, pa)
            sizes = {self.size[self.find(p)] for p in cat}
            outer = self.size[self.find(prod[0])]
            if len(sizes) == 1 and outer == len(cat):
                self.freeze(prod[0], "a concatenation is also reshaped into groups")
                inner = prod[1] if len(prod) == 2 else self.new(sizes.pop())
                if len(prod) > 2:
                    self.refine(inner, "prod", prod[1:])
                for p in cat:
                    self.unify(p, inner)
                self.parts[r] = ("prod", prod)
                return
            self.freeze(r, "an axis is both concatenated and reshaped in incompatible ways")
            self.parts[r] = a
            return
        la, lb = self.leaves_of(pa, ma), self.leaves_of(pb, mb)
        if ma == "prod":
            ok = self._align(la, lb, prod=True)
        else:
            ok = self._align(la, lb, prod=False)
        if not ok:
            self.freeze(r, "reshapes of this axis factorise it in incompatible ways")
        self.parts[r] = a

    def leaves_of(self, parts: list[int], mode: str) -> list[int]:
        out: list[int] = []
        for p in parts:
            rp = self.find(p)
            sub = self.parts.get(rp)
            if sub and sub[0] == mode:
                out.extend(self.leaves_of(sub[1], mode))
            else:
                out.append(rp)
        return out

    def _align(self, la: list[int], lb: list[int], prod: bool) -> bool:
        """Split the items of two same-size sequences at their union of boundaries, then tie."""
        def bounds(lst: list[int]) -> list[int]:
            acc, out = (1 if prod else 0), []
            for v in lst:
                acc = acc * self.size[v] if prod else acc + self.size[v]
                out.append(acc)
            return out

        ba, bb = bounds(la), bounds(lb)
        merged = sorted(set(ba) | set(bb))
        if prod and any(merged[i + 1] % merged[i] for i in range(len(merged) - 1)):
            return False
        atoms, prev = [], (1 if prod else 0)
        for m in merged:
            atoms.append(m // prev if prod else m - prev)
            prev = m
        for lst, bl in ((la, ba), (lb, bb)):
            k = 0
            for v, end in zip(lst, bl):
                mine = []
                while k < len(merged) and merged[k] <= end:
                    mine.append(atoms[k])
                    k += 1
                if len(mine) > 1:
                    self.refine(v, "prod" if prod else "cat", [self.new(s) for s in mine])
        la2 = self.leaves_of(la, "prod" if prod else "cat")
        lb2 = self.leaves_of(lb, "prod" if prod else "cat")
        if [self.size[v] for v in la2] != [self.size[v] for v in lb2]:
            return False
        for x, y in zip(la2, lb2):
            self.unify(x, y)
        return True


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


# --------------------------------------------------------------------------------------------
# Op rules.
class RuleContext:
    """What a coupling rule sees: the op, its input/output values and helpers over their axes."""

    def __init__(self, pg: PruneGraph, table: VarTable, axis_var: dict[Axis, int]):
        self.pg, self.t, self.axis_var = pg, table, axis_var
        self.op = ""
        self.bound: set[Axis] = set()
        self.all_bound: set[Axis] = set()
        self.op_vars: dict[str, dict[str, int]] = {}

    @property
    def where(self) -> str:
        return f"{self.op} ({self.pg.op(self.op).source})"

    def ins(self) -> list[str | None]:
        return self.pg.op_inputs(self.op)

    def outs(self) -> list[str]:
        return self.pg.op_outputs(self.op)

    def shape(self, v: str) -> tuple[int, ...]:
        return tuple(self.pg.value(v).shape or ())

    def var(self, v: str, axis: int) -> int:
        axis %= max(len(self.shape(v)), 1)
        self.bound.add((v, axis))
        self.all_bound.add((v, axis))
        return self.axis_var[(v, axis)]

    def tie(self, a: str, ai: int, b: str, bi: int) -> None:
        if self.shape(a)[ai] == self.shape(b)[bi]:
            self.t.unify(self.var(a, ai), self.var(b, bi))

    def fresh(self, size: int, frozen: str | None = None) -> int:
        return self.t.new(size, frozen)

    def freeze_axis(self, v: str, axis: int, why: str) -> None:
        self.t.freeze(self.var(v, axis), f"{why} at {self.where}")

    def freeze_value(self, v: str, why: str) -> None:
        for a in range(len(self.shape(v))):
            self.freeze_axis(v, a, why)


RuleFn = Callable[[RuleContext], None]
COUPLING_RULES: dict[str, RuleFn] = {}


def coupling_rule(*kinds: str) -> Callable[[RuleFn], RuleFn]:
    def deco(fn: RuleFn) -> RuleFn:
        for k in kinds:
            COUPLING_RULES[k] = fn
        return fn

    return deco


@coupling_rule("add", "sub", "mul", "div", "pow", "where", "maximum", "minimum", "elementwise",
               "activation", "identity", "cast")  # fmt: skip
def _broadcast(c: RuleContext) -> None:
    for out in c.outs():
        ro = len(c.shape(out))
        for v in c.ins():
            if v is None:
                continue
            rv = len(c.shape(v))
            for i in range(rv):
                j = i + ro - rv
                if j >= 0 and c.shape(v)[i] == c.shape(out)[j]:
                    c.tie(v, i, out, j)


@coupling_rule("linear")
def _linear(c: RuleContext) -> None:
    ins = c.ins() + [None, None]
    xs, ws, bs = c.pg.op(c.op).attrs.get("slots", (0, 1, 2))
    x, w, b = ins[xs], ins[ws], ins[bs]
    out = c.outs()[0]
    o_ax, i_ax = (0, 1) if c.pg.op(c.op).attrs.get("w_layout", "oi") == "oi" else (1, 0)
    c.tie(x, -1, w, i_ax)
    c.tie(out, -1, w, o_ax)
    if b is not None:
        c.tie(b, -1, w, o_ax)
    for i in range(len(c.shape(x)) - 1):
        c.tie(x, i, out, i)


@coupling_rule("matmul")
def _matmul(c: RuleContext) -> None:
    a, b = c.ins()[:2]
    out = c.outs()[0]
    ra, rb, ro = len(c.shape(a)), len(c.shape(b)), len(c.shape(out))
    c.tie(a, -1, b, -2 if rb >= 2 else 0)
    if rb >= 2:
        c.tie(out, -1, b, -1)
    if ra >= 2:
        c.tie(out, ro - (2 if rb >= 2 else 1), a, -2)
    for v, rv in ((a, ra), (b, rb)):
        for i in range(rv - 2):  # batch axes broadcast from the right
            j = i + (ro - 2) - (rv - 2)
            if j >= 0 and c.shape(v)[i] == c.shape(out)[j]:
                c.tie(v, i, out, j)


@coupling_rule("outer")
def _outer(c: RuleContext) -> None:
    a, b = c.ins()[:2]
    out = c.outs()[0]
    c.tie(a, 0, out, 0)
    c.tie(b, 0, out, 1)


@coupling_rule("conv", "conv_transpose")
def _conv(c: RuleContext) -> None:
    ins = c.ins()
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    out = c.outs()[0]
    g = int(c.pg.op(c.op).attrs.get("groups", 1))
    transpose = c.pg.op(c.op).kind == "conv_transpose"
    w_in, w_out = (0, 1) if transpose else (1, 0)
    c.tie(x, 0, out, 0)
    if g == 1:
        c.tie(x, 1, w, w_in)
        c.tie(out, 1, w, w_out)
    else:
        gv = c.fresh(g)
        c.op_vars[c.op] = {"groups": gv}
        if transpose:  # W: (C_in, C_out/g, ...)
            c.t.refine(c.var(x, 1), "prod", [gv, c.fresh(c.shape(w)[0] // g)])
            c.t.unify(c.var(x, 1), c.var(w, 0))
            c.t.refine(c.var(out, 1), "prod", [gv, c.var(w, 1)])
        else:  # W: (C_out, C_in/g, ...)
            c.t.refine(c.var(x, 1), "prod", [gv, c.var(w, 1)])
            c.t.refine(c.var(w, 0), "prod", [gv, c.fresh(c.shape(w)[0] // g)])
            c.t.unify(c.var(out, 1), c.var(w, 0))
    if b is not None:
        c.tie(b, 0, out, 1)


@coupling_rule("embedding")
def _embedding(c: RuleContext) -> None:
    ins = c.ins()
    # torch: embedding(weight, indices); ONNX Gather(table, indices) is normalised to the same.
    w, idx = ins[0], ins[1]
    out = c.outs()[0]
    c.tie(out, -1, w, 1)
    c.freeze_axis(w, 0, "rows are looked up by token id")
    for i in range(len(c.shape(idx))):
        c.tie(idx, i, out, i)


@coupling_rule("batch_norm", "instance_norm")
def _channel_norm(c: RuleContext) -> None:
    x, *params = c.ins()
    out = c.outs()[0]
    for i in range(len(c.shape(x))):
        c.tie(x, i, out, i)
    for p in params:
        if p is not None and len(c.shape(p)) == 1:
            c.tie(p, 0, x, 1)
    if c.pg.op(c.op).kind == "instance_norm":  # statistics over every axis after the channel
        for i in range(2, len(c.shape(x))):
            c.t.reduce(c.var(x, i), f"{c.op}: instance statistics over this axis")


@coupling_rule("layer_norm")
def _layer_norm(c: RuleContext) -> None:
    x, *params = c.ins()
    out = c.outs()[0]
    k = int(c.pg.op(c.op).attrs.get("normalized_ndim", 1))
    r = len(c.shape(x))
    for i in range(r):
        c.tie(x, i, out, i)
    for p in params:
        if p is None:
            continue
        for i in range(len(c.shape(p))):
            c.tie(p, i, x, r - len(c.shape(p)) + i)
    for i in range(r - k, r):
        c.t.reduce(c.var(x, i), f"{c.op}: normalisation statistics over this axis")


@coupling_rule("group_norm")
def _group_norm(c: RuleContext) -> None:
    x, *params = c.ins()
    out = c.outs()[0]
    g = int(c.pg.op(c.op).attrs["num_groups"])
    for i in range(len(c.shape(x))):
        c.tie(x, i, out, i)
    for p in params:
        if p is not None:
            c.tie(p, 0, x, 1)
    gv, per = c.fresh(g), c.fresh(c.shape(x)[1] // g)
    c.op_vars[c.op] = {"groups": gv}
    c.t.refine(c.var(x, 1), "prod", [gv, per])
    c.t.reduce(per, f"{c.op}: group statistics over channels of a group")


@coupling_rule("cat")
def _cat(c: RuleContext) -> None:
    ax = c.pg.op(c.op).attrs["axis"]
    out = c.outs()[0]
    ins = [v for v in c.ins() if v is not None]
    for v in ins:
        for i in range(len(c.shape(v))):
            if i != ax:
                c.tie(v, i, out, i)
    c.t.refine(c.var(out, ax), "cat", [c.var(v, ax) for v in ins])


@coupling_rule("stack")
def _stack(c: RuleContext) -> None:
    ax = c.pg.op(c.op).attrs["axis"]
    out = c.outs()[0]
    for v in c.ins():
        if v is None:
            continue
        for i in range(len(c.shape(v))):
            c.tie(v, i, out, i if i < ax else i + 1)
    c.freeze_axis(out, ax, "stacked axis")


@coupling_rule("split")
def _split(c: RuleContext) -> None:
    x = c.ins()[0]
    ax = c.pg.op(c.op).attrs["axis"]
    outs = c.outs()
    for o in outs:
        for i in range(len(c.shape(x))):
            if i != ax:
                c.tie(x, i, o, i)
    sizes = [c.shape(o)[ax] for o in outs]
    if c.pg.op(c.op).attrs.get("uniform", False) or (len(set(sizes)) == 1 and c.pg.op(
            c.op).attrs.get("aten") in ("chunk", "split")):
        if len(set(sizes)) != 1:
            c.freeze_axis(x, ax, "uneven chunks")
            for o in outs:
                c.freeze_axis(o, ax, "uneven chunks")
            return
        inner = c.fresh(sizes[0])
        c.t.refine(c.var(x, ax), "prod", [c.fresh(len(outs), f"number of chunks at {c.where}"),
                                          inner])  # fmt: skip
        for o in outs:
            c.t.unify(c.var(o, ax), inner)
    else:
        c.t.refine(c.var(x, ax), "cat", [c.var(o, ax) for o in outs])


@coupling_rule("unbind")
def _unbind(c: RuleContext) -> None:
    x = c.ins()[0]
    ax = c.pg.op(c.op).attrs["axis"]
    c.freeze_axis(x, ax, "unbound axis")
    for o in c.outs():
        for i in range(len(c.shape(x))):
            if i != ax:
                c.tie(x, i, o, i if i < ax else i - 1)


@coupling_rule("select")
def _select(c: RuleContext) -> None:
    x = c.ins()[0]
    out = c.outs()[0]
    ax = c.pg.op(c.op).attrs["axis"]
    c.freeze_axis(x, ax, "indexed by position")
    for i in range(len(c.shape(x))):
        if i != ax:
            c.tie(x, i, out, i if i < ax else i - 1)


@coupling_rule("slice")
def _slice(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    a = c.pg.op(c.op).attrs
    ax, start, end, step = a["axis"], a["start"], a["end"], a.get("step", 1)
    for i in range(len(c.shape(x))):
        if i != ax:
            c.tie(x, i, out, i)
    size = c.shape(x)[ax]
    if step != 1:
        c.freeze_axis(x, ax, "strided slice")
        c.freeze_axis(out, ax, "strided slice")
        return
    if start == 0 and end >= size:
        c.tie(x, ax, out, ax)
        return
    parts = [c.fresh(start), c.var(out, ax), c.fresh(size - end)]
    c.t.refine(c.var(x, ax), "cat", parts)


@coupling_rule("reshape", "flatten", "squeeze", "unsqueeze")
def _reshape(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    s, t = c.shape(x), c.shape(out)
    si = [i for i, d in enumerate(s) if d != 1]
    ti = [j for j, d in enumerate(t) if d != 1]
    i = j = 0
    while i < len(si) and j < len(ti):
        gi, gj = [si[i]], [ti[j]]
        ps, pt = s[si[i]], t[ti[j]]
        i, j = i + 1, j + 1
        while ps != pt:
            if ps < pt and i < len(si):
                gi.append(si[i])
                ps *= s[si[i]]
                i += 1
            elif pt < ps and j < len(ti):
                gj.append(ti[j])
                pt *= t[ti[j]]
                j += 1
            else:
                break
        if ps != pt:
            c.freeze_value(x, "reshape with unmatched sizes")
            c.freeze_value(out, "reshape with unmatched sizes")
            return
        xs, os_ = [c.var(x, k) for k in gi], [c.var(out, k) for k in gj]
        if len(xs) == 1 and len(os_) == 1:
            c.t.unify(xs[0], os_[0])
        elif len(xs) == 1:
            c.t.refine(xs[0], "prod", os_)
        elif len(os_) == 1:
            c.t.refine(os_[0], "prod", xs)
        else:
            whole = c.fresh(ps)
            c.t.refine(whole, "prod", xs)
            c.t.refine(whole, "prod", os_)


@coupling_rule("permute", "transpose")
def _permute(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    for j, p in enumerate(c.pg.op(c.op).attrs["perm"]):
        c.tie(x, p, out, j)


@coupling_rule("expand")
def _expand(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    rx, ro = len(c.shape(x)), len(c.shape(out))
    for i in range(rx):
        j = i + ro - rx
        if c.shape(x)[i] == c.shape(out)[j]:
            c.tie(x, i, out, j)


@coupling_rule("repeat")
def _repeat(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    rx, ro = len(c.shape(x)), len(c.shape(out))
    interleave = c.pg.op(c.op).attrs.get("interleave", False)
    for i in range(rx):
        j = i + ro - rx
        n_in, n_out = c.shape(x)[i], c.shape(out)[j]
        if n_in == n_out:
            c.tie(x, i, out, j)
        elif n_in > 1 and n_out % n_in == 0:
            rep = c.fresh(n_out // n_in, f"repeat count at {c.where}")
            parts = [c.var(x, i), rep] if interleave else [rep, c.var(x, i)]
            c.t.refine(c.var(out, j), "prod", parts)


@coupling_rule("pool", "adaptive_pool", "global_pool", "upsample", "pad")
def _resize(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    for i in range(min(len(c.shape(x)), len(c.shape(out)))):
        if c.shape(x)[i] == c.shape(out)[i]:
            c.tie(x, i, out, i)


@coupling_rule("reduce")
def _reduce(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    a = c.pg.op(c.op).attrs
    axes, keep = set(a["axes"]), a.get("keepdim", False)
    j = 0
    for i in range(len(c.shape(x))):
        if i in axes:
            c.t.reduce(c.var(x, i), f"{c.op}: {a.get('op', 'reduce')} over this axis")
            if keep:
                j += 1
            continue
        c.tie(x, i, out, j)
        j += 1


@coupling_rule("softmax")
def _softmax(c: RuleContext) -> None:
    x, out = c.ins()[0], c.outs()[0]
    for i in range(len(c.shape(x))):
        c.tie(x, i, out, i)
    c.t.reduce(c.var(x, c.pg.op(c.op).attrs["axis"]), f"{c.op}: softmax over this axis")


@coupling_rule("sdpa")
def _sdpa(c: RuleContext) -> None:
    ins = c.ins()
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else None
    out = c.outs()[0]
    c.tie(q, -1, k, -1)  # contraction over head_dim
    c.tie(k, -2, v, -2)
    c.tie(out, -1, v, -1)
    c.tie(out, -2, q, -2)
    r = len(c.shape(q))
    for i in range(r - 2):
        if c.shape(q)[i] == c.shape(k)[i]:
            for y in (k, v, out):
                c.tie(q, i, y, i)
        elif c.shape(q)[i] % c.shape(k)[i] == 0:  # grouped-query attention (enable_gqa)
            c.tie(k, i, v, i)
            c.tie(q, i, out, i)
            rep = c.fresh(c.shape(q)[i] // c.shape(k)[i], f"query heads per kv head at {c.where}")
            c.t.refine(c.var(q, i), "prod", [c.var(k, i), rep])
    c.t.reduce(c.var(k, -2), f"{c.op}: softmax over keys")
    if mask is not None:
        rm = len(c.shape(mask))
        scores = c.shape(q)[:-1] + (c.shape(k)[-2],)
        for i in range(rm):
            j = i + len(scores) - rm
            if j < 0 or c.shape(mask)[i] != scores[j] or c.shape(mask)[i] == 1:
                continue
            src, sa = (k, r - 2) if j == len(scores) - 1 else (q, j)
            c.tie(mask, i, src, sa)


def _opaque(c: RuleContext) -> None:
    op = c.pg.op(c.op)
    why = f"op kind {op.kind!r} has no coupling rule" if op.kind != "unknown" else (
        "op is not in the coupling table")
    for v in c.ins() + c.outs():
        if v is not None:
            c.freeze_value(v, why)


@coupling_rule("creation")
def _creation(c: RuleContext) -> None:
    for v in c.ins():
        if v is not None:
            c.freeze_value(v, "shape read by a tensor-creating op")


# --------------------------------------------------------------------------------------------
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
    return pg.cached("coupling", _build_coupling)


def _build_coupling(pg: PruneGraph) -> Coupling:
    t = VarTable()
    axis_var: dict[Axis, int] = {}
    for v in pg.values():
        val = pg.value(v)
        for a, d in enumerate(val.shape or ()):
            axis_var[(v, a)] = t.new(d)
    ctx = RuleContext(pg, t, axis_var)
    for o in pg.ops():
        ctx.op, ctx.bound = o, set()
        COUPLING_RULES.get(pg.op(o).kind, _opaque)(ctx)
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
    for va in [va for va in axis_var if va[0] in params and va not in ctx.all_bound]:
        t.freeze(axis_var[va], "not a channel axis of any op that reads this parameter")
    cp = Coupling(pg, t, axis_var, ctx.op_vars)
    _collect_groups(cp)
    return cp


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
