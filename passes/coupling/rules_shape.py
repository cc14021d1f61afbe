"""Coupling rules of elementwise and shape ops: broadcasting, cat/split/slice, reshape, permute.

Elementwise ops tie the axes they broadcast together (right-aligned, equal sizes). Shape ops move
axes around: ``cat``/``split``/``slice`` state concatenations, ``reshape``/``flatten`` row-major
factorisations, ``chunk``-style uniform splits a "number of chunks × size" product whose outer
factor is frozen (it would remove a whole output). Axes an op indexes, stacks or creates are
frozen with the reason. Registered in :data:`~graphprune.passes.coupling.rules.COUPLING_RULES`.
"""

from __future__ import annotations

from graphprune.passes.coupling.rules import RuleContext, coupling_rule


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
    if step != 1 or a.get("symbolic_bounds"):
        # symbolic bounds (ONNX: a slice to the sequence length, kept symbolic): positions
        # unread at the analysed size are read at others, so none of them may go
        why = "strided slice" if step != 1 else "slice bounds follow a symbolic input dim"
        c.freeze_axis(x, ax, why)
        c.freeze_axis(out, ax, why)
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



@coupling_rule("creation")
def _creation(c: RuleContext) -> None:
    for v in c.ins():
        if v is not None:
            c.freeze_value(v, "shape read by a tensor-creating op")
