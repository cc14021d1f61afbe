"""Coupling rules of contractions, normalisations and reductions.

``linear``/``matmul``/``conv`` tie the contracted axis of the input to the weight's input axis and
the output channel axis to the weight's output axis; a grouped conv factorises its channels into
``groups × per-group`` (the group count is an op variable the plan resizes, ``op_vars``). Norms
tie their affine parameters to the channel axis and record the axes their statistics run over in
``Group.reductions`` (removing such channels changes the statistics: an approximation the report
states). Registered in :data:`~graphprune.passes.coupling.rules.COUPLING_RULES`.
"""

from __future__ import annotations

from graphprune.passes.coupling.rules import RuleContext, coupling_rule


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
        # Index positions are positions (tokens, window offsets): removing one would have to
        # rewrite the index values too. Token ids reach a model input anyway.
        c.freeze_axis(idx, i, "positions of a gather's indices")


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
