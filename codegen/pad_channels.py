"""Pad activation channel counts that waste the SIMD width (CPU, NHWC), with zero weights.

A structurally pruned CNN keeps channel counts such as 12 or 72: our contraction kernels
vectorise the output channel, so 12 channels run on 4-lane and 72 on 8-lane vectors of a
16-lane AVX-512 machine, and those layers ran 2-4x below the speed of their dense
counterparts (MobileNetV2 at 50%: the 56x56 stage). This pass widens such a channel group to the
next multiple of the vector width, the way oneDNN's blocked ``nChw16c`` layouts do: the convs
that produce the group get zero output filters, the convs and matmuls that read it get zero
input rows, depthwise convs and the elementwise ops in between (BN scale/shift, ReLU, residual
adds) run on the wider tensors with padded constants. The extra channels hold finite values
that every reader multiplies by zero, so the model's outputs are unchanged; what it costs is
the padded MACs, which the wider vectors more than repay (only where :func:`padded_width`
says so).

Runs in :func:`graphprune.codegen.build.build` on CPU with our schedule, after
``ConvertLayout`` (channels are the last axis) and the epilogue folding, before
``LiftTransformParams``, which then precomputes the padded weights (they ship padded).

A *channel group* is a set of activations whose last axes are the same channels (union-find
over elementwise ops, depthwise convs, ``mean`` over other axes, reshapes that keep the last
axis, batch-norm tuples). A group is padded only if every use of every member is one of those
ops or a reader that can take zero rows (``conv2d`` with ``groups=1``, ``matmul`` by a weight);
anything else (model outputs, reductions over channels, transposes) leaves the group as it is.
"""

from __future__ import annotations

from graphprune.codegen.lower import num_inputs

__all__ = ["pad_channels", "padded_width"]

_BINARY = ("add", "subtract", "multiply", "divide", "maximum", "minimum")
# Unary ops that are finite on finite inputs (padded channels must never become inf/nan:
# their readers multiply them by zero, and 0 * nan is nan).
_UNARY = ("nn.relu", "negative", "sigmoid", "tanh", "erf", "clip", "nn.silu", "nn.gelu",
          "nn.gelu_tanh", "nn.leakyrelu")  # fmt: skip


def padded_width(channels: int, lanes: int) -> int | None:
    """The channel count to pad ``channels`` to, or ``None`` when padding does not pay.

    Kernels vectorise on the largest power of two dividing the channel count (up to
    ``lanes``); padding to a multiple of ``lanes`` pays where it cuts the vector operations
    per output pixel by a quarter or more: 12 -> 16, 24 -> 32, 72 -> 80 at 16 lanes; not 8
    (twice the MACs on vectors twice as wide) nor 48 (already full vectors).

    >>> padded_width(12, 16), padded_width(72, 16), padded_width(8, 16), padded_width(48, 16)
    (16, 80, None, None)
    """
    vec = _lanes(channels, lanes)
    if vec >= lanes:
        return None
    wide = -(-channels // lanes) * lanes
    return wide if wide / lanes <= 0.75 * channels / vec else None


def _shape(expr) -> tuple[int, ...] | None:
    from tvm import relax

    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        return None


class _Groups:
    """Union-find over activation vars; a root may be marked unpaddable."""

    def __init__(self):
        self.parent: dict = {}
        self.bad: set = set()

    def find(self, v):
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra
            if rb in self.bad:
                self.bad.add(ra)

    def mark_bad(self, v):
        self.bad.add(self.find(v))

    def is_bad(self, v):
        return self.find(v) in self.bad


def _analyse(main, lanes: int):
    """Return ``{var: padded channels}`` for every activation of a paddable group."""
    from tvm import relax

    num_input = num_inputs(main)
    const = set(main.params[num_input:])  # depends on weights only
    groups = _Groups()
    producers = set()  # vars written by a conv2d with groups=1 (zero output filters)
    tuples: dict = {}
    # Work estimates per member var, in MACs / vector lanes (see _worth_padding): convs that
    # write the group (pixels, reduction length), depthwise convs in it (pixels, taps) and
    # readers of it (pixels, output channels).
    writes: dict = {}
    depthwise: dict = {}
    reads: dict = {}

    def is_const(e):
        from tvm.ir.expr import Constant

        return isinstance(e, Constant) or e in const

    def act(e):
        return isinstance(e, relax.Var) and not is_const(e)

    def spoil(*exprs):
        for e in exprs:
            if act(e):
                groups.mark_bad(e)
            if isinstance(e, relax.Var) and e in tuples:
                for f in tuples[e]:
                    if act(f):
                        groups.mark_bad(f)

    for block in main.body.blocks:
        for b in block.bindings:
            v, val = b.var, b.value
            if isinstance(val, relax.Tuple):
                if all(is_const(f) for f in val.fields):
                    const.add(v)
                else:
                    tuples[v] = list(val.fields)
                continue
            if isinstance(val, relax.TupleGetItem):
                src = val.tuple_value
                if isinstance(src, relax.Var) and src in tuples:
                    f = tuples[src][val.index]
                    if is_const(f):
                        const.add(v)
                    elif act(f):
                        groups.union(v, f)
                    else:
                        groups.mark_bad(v)
                elif is_const(src):
                    const.add(v)
                else:
                    spoil(src)
                    groups.mark_bad(v)
                continue
            if not isinstance(val, relax.Call):
                if isinstance(val, relax.Var):
                    spoil(val)
                groups.mark_bad(v)
                continue
            args = list(val.args)
            if all(is_const(a) or isinstance(a, relax.ShapeExpr) for a in args):
                const.add(v)
                continue
            name = getattr(val.op, "name", "").removeprefix("relax.")
            out = _shape(v)
            groups.find(v)
            if out is None or not out or str(v.ty.dtype) not in ("float32", "float16"):
                spoil(v, *args)
                continue
            c = out[-1]
            if name in _BINARY:
                for i, a in enumerate(args):
                    s = _shape(a)
                    if is_const(a):
                        if s is None or (s and s[-1] not in (1, c)):
                            spoil(v)
                    elif s == out and not (name == "divide" and i == 1):
                        groups.union(v, a)
                    else:  # broadcast activation or activation denominator (0/0 in padding)
                        spoil(v, a)
            elif name in _UNARY:
                if _shape(args[0]) == out:
                    groups.union(v, args[0])
                else:
                    spoil(v, args[0])
            elif name == "nn.conv2d":
                x, w = args
                a = val.attrs
                layouts = (a.data_layout, a.kernel_layout, str(a.out_layout or a.data_layout))
                xs = _shape(x)
                if layouts != ("NHWC", "HWIO", "NHWC") or not is_const(w) or xs is None:
                    spoil(v, x)
                elif int(a.groups) == 1:
                    producers.add(v)  # v starts its own group; x is read with zero rows
                    ws, pixels = _shape(w), _prod(out[:-1])
                    writes.setdefault(v, []).append((pixels, ws[0] * ws[1] * ws[2]))
                    reads.setdefault(x, []).append((pixels * ws[0] * ws[1], c))
                elif int(a.groups) == xs[-1] == c:
                    groups.union(v, x)  # depthwise: one filter per channel
                    ws = _shape(w)
                    depthwise.setdefault(v, []).append((_prod(out[:-1]), ws[0] * ws[1]))
                else:
                    spoil(v, x)
            elif name == "mean":
                xs = _shape(args[0]) or (0,)
                axes = [int(i) % len(xs) for i in (val.attrs.axis or [])]
                if axes and len(xs) - 1 not in axes and xs[-1] == c:  # over H, W: keeps C
                    groups.union(v, args[0])
                else:
                    spoil(v, args[0])
            elif name == "reshape":
                if (_shape(args[0]) or (0,))[-1] == c:
                    groups.union(v, args[0])
                else:
                    spoil(v, args[0])
            elif name == "matmul":
                x, w = args
                if not (is_const(w) and len(_shape(w) or ()) == 2 and len(_shape(x) or ()) >= 2):
                    spoil(v, x, w)
                else:
                    reads.setdefault(x, []).append((_prod(_shape(x)[:-1]), c))
                # else: x is read with zero rows of w; v is not in x's group
                groups.mark_bad(v)  # a matmul result is never padded (no zero filters)
            else:
                spoil(v, *args)
    ret = main.body.body
    for e in ret.fields if isinstance(ret, relax.Tuple) else [ret]:
        spoil(e)

    members: dict = {}
    for v in list(groups.parent):
        members.setdefault(groups.find(v), []).append(v)
    plan = {}
    for root, vs in members.items():
        if root in groups.bad or not any(v in producers for v in vs):
            continue
        width = _shape(vs[0])[-1]
        if any(_shape(v)[-1] != width for v in vs):
            continue
        wide = padded_width(width, lanes)
        if wide is None:
            continue
        cost = {}
        for n in (width, wide):  # MACs per vector op, before and after padding
            cost[n] = sum(p * n * k / _lanes(n, lanes) for v in vs for p, k in writes.get(v, []))
            cost[n] += sum(
                p * n * t / _lanes(n, lanes) for v in vs for p, t in depthwise.get(v, [])
            )
            cost[n] += sum(p * n * d / _lanes(d, lanes) for v in vs for p, d in reads.get(v, []))
        # Readers pay the padded rows at their own vector width: widening a group that many
        # convs read (the 24 channels of a dense MobileNetV2 stage) can cost more than it saves.
        if cost[wide] <= 0.9 * cost[width]:
            plan.update({v: wide for v in vs})
    return plan, const


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _lanes(channels: int, lanes: int) -> int:
    """The vector width our kernels use for ``channels`` (largest power of two dividing it)."""
    vec = 1
    while vec < lanes and channels % (vec * 2) == 0:
        vec *= 2
    return vec


def pad_channels(lanes: int, report: list | None = None):
    """The Relax pass (see the module docstring); ``lanes`` = fp32 SIMD lanes of the target.

    ``report`` (optional) receives one ``{"channels", "padded_to", "tensors"}`` dict per padded
    group, for the manifest: the kernels then show the padded widths, not the model's."""
    import tvm
    from tvm import relax

    def pad_last(e, axis: int, extra: int, value: float = 0.0):
        rank = len(_shape(e))
        width = [0] * (2 * rank)
        width[2 * (axis % rank) + 1] = extra
        return relax.op.nn.pad(e, width, pad_value=value)

    @relax.expr_functor.mutator
    class _Pad(relax.PyExprMutator):
        def __init__(self, mod, plan, const):
            super().__init__(mod)
            self.plan = plan
            self.const = const

        def wide(self, old_var):
            return self.plan.get(old_var)

        def rewrite(self, v, call):
            """The padded form of ``v = call`` (args already remapped), or ``None``."""
            name = getattr(call.op, "name", "")
            old_args = list(call.args)
            args = [self.visit_expr(a) for a in old_args]
            mine = self.wide(v)
            if name == "relax.nn.conv2d":
                x_old, w = old_args
                x, w = args
                a = call.attrs
                pad_in = self.wide(x_old) if isinstance(x_old, relax.Var) else None
                c_in, c_out = _shape(x_old)[-1], _shape(v)[-1]
                groups = int(a.groups)
                if groups == 1:
                    if pad_in:
                        w = self.builder_.emit(pad_last(w, 2, pad_in - c_in))
                    if mine:
                        w = self.builder_.emit(pad_last(w, 3, mine - c_out))
                    if not (pad_in or mine):
                        return None
                elif mine:  # depthwise
                    w = self.builder_.emit(pad_last(w, 3, mine - c_out))
                    groups = mine
                else:
                    return None
                return relax.op.nn.conv2d(
                    x, w, a.strides, a.padding, a.dilation, groups, a.data_layout,
                    a.kernel_layout, a.out_layout, a.out_dtype,
                )  # fmt: skip
            if name == "relax.matmul":
                x_old = old_args[0]
                pad_in = self.wide(x_old) if isinstance(x_old, relax.Var) else None
                if not pad_in:
                    return None
                w = self.builder_.emit(pad_last(args[1], 0, pad_in - _shape(x_old)[-1]))
                return relax.op.matmul(args[0], w, out_dtype=call.attrs.out_dtype)
            if not mine:
                return None
            c = _shape(v)[-1]
            if name == "relax.reshape":
                return relax.op.reshape(args[0], list(_shape(v)[:-1]) + [mine])
            short = name.removeprefix("relax.")
            if short in _BINARY:
                new = []
                for i, (o, a) in enumerate(zip(old_args, args)):
                    s = _shape(o)
                    if (o in self.const or not isinstance(o, relax.Var)) and s and s[-1] == c:
                        fill = 1.0 if short == "divide" and i == 1 else 0.0
                        a = self.builder_.emit(pad_last(a, -1, mine - c, fill))
                    new.append(a)
                return relax.Call(call.op, new, call.attrs)
            return None  # unary, mean, ...: shapes follow from the padded argument

        def visit_var_binding_(self, binding):
            v, val = binding.var, binding.value
            new = self.rewrite(v, val) if isinstance(val, relax.Call) else None
            if new is None:
                return super().visit_var_binding_(binding)
            new = self.builder_.normalize(new)
            cls = relax.DataflowVar if isinstance(v, relax.DataflowVar) else relax.Var
            var = cls(v.name, new.ty)
            self.builder_.emit_normalized(relax.VarBinding(var, new))
            self.set_var_remap(v, var)

    @tvm.transform.module_pass(opt_level=0, name="GraphPrunePadChannels")
    def _pass(mod, _ctx):
        main = mod["main"]
        plan, const = _analyse(main, lanes)
        if report is not None:
            groups: dict = {}
            for v, wide in plan.items():
                key = (_shape(v)[-1], wide)
                groups[key] = groups.get(key, 0) + 1
            report.extend(
                {"channels": c, "padded_to": w, "tensors": n}
                for (c, w), n in sorted(groups.items())
            )
        if not plan:
            return mod
        rewriter = _Pad(mod, plan, const)
        rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(main))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass
