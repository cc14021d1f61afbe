"""The coupling rule registry: what a rule sees (:class:`RuleContext`) and where rules live.

One registry, :data:`COUPLING_RULES`, maps a normalised IR op kind (``graphprune.ir.OP_KINDS``) to
the rule that relates the dimension variables of that op's inputs, parameters and outputs. Rules
register themselves with ``@coupling_rule("kind", ...)``; they are grouped by op family in
``rules_shape`` (elementwise and shape ops), ``rules_contraction`` (linear, conv, matmul, norms,
reductions) and ``rules_attention`` (softmax, scaled dot-product attention), which
:mod:`~graphprune.passes.coupling.build` imports so that the table is complete.

An op kind with no rule gets :func:`opaque_rule`: every axis flowing through the op is frozen with
a reason, never silently skipped. A rule that asks the table to equate axes of different sizes
gets :class:`~graphprune.ir.CouplingError` naming the op and the shapes it read.
"""

from __future__ import annotations

from collections.abc import Callable

from graphprune.ir import OP_KINDS, PruneGraph
from graphprune.passes.coupling.table import Axis, VarTable


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
    """Register the decorated function as the coupling rule of each of ``kinds``."""

    def deco(fn: RuleFn) -> RuleFn:
        for k in kinds:
            if k not in OP_KINDS:
                raise ValueError(f"coupling rule for {k!r}: not an IR op kind (see OP_KINDS)")
            old = COUPLING_RULES.get(k)
            if old is not None and (old.__module__, old.__qualname__) != (
                    fn.__module__, fn.__qualname__):  # a reload re-registers the same rule
                raise ValueError(f"op kind {k!r} has two coupling rules: "
                                 f"{COUPLING_RULES[k].__name__} and {fn.__name__}")  # fmt: skip
            COUPLING_RULES[k] = fn
        return fn

    return deco


def opaque_rule(c: RuleContext) -> None:
    """The rule of an op kind without one: freeze every axis the op reads or writes."""
    op = c.pg.op(c.op)
    why = f"op kind {op.kind!r} has no coupling rule" if op.kind != "unknown" else (
        "op is not in the coupling table")
    for v in c.ins() + c.outs():
        if v is not None:
            c.freeze_value(v, why)


def rule_for(kind: str) -> RuleFn:
    """The registered rule of op ``kind``, or :func:`opaque_rule`."""
    return COUPLING_RULES.get(kind, opaque_rule)
