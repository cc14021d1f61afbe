"""Cost model: parameters and multiply-accumulates (MACs) per op, from the IR's shapes.

Reads shapes from the graph or, after a planned removal, from ``RemovalPlan.new_shapes``, so a
pass can cost a plan before anything is written back. MACs are counted at a stated shape: by
default the example inputs', or ``at={"batch": 1, "seq": 128}`` for a graph with dynamic axes
(``Value.symbols``; channel axes are static, so a plan's shapes combine with any ``at``). Elementwise ops, norms and reshapes count
zero MACs (the convention of the published MAC counts for ResNet-50 / BERT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from graphprune.ir import PruneGraph

Shapes = Mapping[str, tuple[int, ...]]


class _At(dict):
    """Planned shapes with the dynamic dims set to stated sizes (``at``)."""

    def __init__(self, pg: PruneGraph, shapes: Shapes, at: Mapping[str, int]):
        super().__init__()
        self.pg, self.shapes, self.at = pg, shapes, dict(at)

    def get(self, v: str, default: tuple[int, ...] = ()) -> tuple[int, ...]:
        if v not in self:
            self[v] = self.pg.shape_at(v, self.at, self.shapes.get(v, default))
        return self[v]


def _shape(pg: PruneGraph, shapes: Shapes, v: str | None) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(shapes.get(v, pg.value(v).shape or ()))


def _conv(pg: PruneGraph, o: str, s: Shapes) -> int:
    ins, out = pg.op_inputs(o), pg.op_outputs(o)[0]
    w = _shape(pg, s, ins[1])
    n_out = math.prod(_shape(pg, s, out))
    if pg.op(o).kind == "conv_transpose":  # every input position scatters into a k-window
        return math.prod(_shape(pg, s, ins[0])) * math.prod(w[1:])
    return n_out * math.prod(w[1:])


def _linear(pg: PruneGraph, o: str, s: Shapes) -> int:
    slots = pg.op(o).attrs.get("slots", (0, 1, 2))
    x = _shape(pg, s, pg.op_inputs(o)[slots[0]])
    return math.prod(_shape(pg, s, pg.op_outputs(o)[0])) * (x[-1] if x else 1)


def _matmul(pg: PruneGraph, o: str, s: Shapes) -> int:
    a = _shape(pg, s, pg.op_inputs(o)[0])
    return math.prod(_shape(pg, s, pg.op_outputs(o)[0])) * (a[-1] if a else 1)


def _sdpa(pg: PruneGraph, o: str, s: Shapes) -> int:
    q, k, v = (_shape(pg, s, x) for x in pg.op_inputs(o)[:3])
    scores = math.prod(q[:-1]) * k[-2]
    return scores * q[-1] + scores * v[-1]


MAC_RULES: dict[str, Callable[[PruneGraph, str, Shapes], int]] = {
    "conv": _conv, "conv_transpose": _conv, "linear": _linear, "matmul": _matmul, "sdpa": _sdpa,
}  # fmt: skip


@dataclass
class Cost:
    params: int
    macs: int
    per_op: dict[str, int] = field(default_factory=dict)
    per_param: dict[str, int] = field(default_factory=dict)


def count(pg: PruneGraph, shapes: Shapes | None = None,
          at: Mapping[str, int] | None = None) -> Cost:  # fmt: skip
    """Parameters (unique tensors, counted once even when tied) and MACs of ``pg``.

    ``shapes`` overrides value shapes (a plan's ``new_shapes``); ``at`` sets dynamic dims by
    name (see :meth:`PruneGraph.dim_ranges`), others stay at their example size.

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> pg = gp.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    >>> count(pg).macs, count(pg, at={"batch": 8}).macs
    (24, 96)
    """
    shapes = shapes or {}
    if at:
        shapes = _At(pg, shapes, at)
    per_op = {}
    for o in pg.ops():
        rule = MAC_RULES.get(pg.op(o).kind)
        if rule is not None:
            per_op[o] = int(rule(pg, o, shapes))
    per_param: dict[str, int] = {}
    # Read values first: of a tied tensor's names, the one the graph reads carries the new shape.
    for p in sorted(pg.params(), key=lambda v: not pg.consumers(v)):
        name = pg.value(p).param
        val = pg.value(p)
        counted = any(n in per_param for n in pg.param_names(name))  # tied: another name
        if not counted and val.trainable and val.dtype.startswith(("float", "bfloat")):
            per_param[name] = math.prod(_shape(pg, shapes, p))
    return Cost(sum(per_param.values()), sum(per_op.values()), per_op, per_param)
