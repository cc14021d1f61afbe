"""Coupling rules of attention: softmax and scaled dot-product attention (``sdpa``).

``sdpa(q, k, v, mask)`` ties q and k over head_dim (the contraction), k and v over the key
positions, and the head axes of q, k, v and the output; under grouped-query attention
(``enable_gqa``) a query head axis is ``kv heads × query heads per kv head``, so removing a kv
head removes its query heads too. Softmax records its axis as a reduction. Registered in
:data:`~graphprune.passes.coupling.rules.COUPLING_RULES`.
"""

from __future__ import annotations

from graphprune.passes.coupling.rules import RuleContext, coupling_rule


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
