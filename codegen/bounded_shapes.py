"""Simplify symbolic shapes with the dynamic dims' declared bounds.

Runs inside :func:`graphprune.codegen.lower` on a module with symbolic input dims, before any
other codegen stage. The importers compute extents without the bounds: Hugging Face models
slice a buffer to the sequence length (``position_ids[:, :seq]``), which imports as
``min(seq, 512)``; adding that to a ``(batch, seq, hidden)`` tensor then has an unknown shape
(Relax cannot prove ``min(seq, 512) == seq``), and legalization refuses tensors of unknown
shape. With ``seq <= 512`` declared (``tir_var_upper_bound``) the analyzer proves it: each
binding whose type simplifies gets a ``match_cast`` to the simplified type, so every later op
infers exact shapes again. The cast is also checked at run time by the VM.
"""

from __future__ import annotations

__all__ = ["simplify_bounded_shapes"]


def _analyzer(main):
    import tvm
    import tvm.sym
    from tvm import tirx

    lower = dict(main.attrs["tir_var_lower_bound"]) if "tir_var_lower_bound" in main.attrs else {}
    upper = dict(main.attrs["tir_var_upper_bound"]) if "tir_var_upper_bound" in main.attrs else {}
    ana = tvm.sym.Analyzer()
    seen = set()
    for p in main.params:
        shape = getattr(p.ty, "shape", None)
        for d in shape.values if shape is not None else ():
            if isinstance(d, tirx.Var) and d.name not in seen:
                seen.add(d.name)
                if d.name in upper:  # an unbounded dim proves nothing about min(d, n)
                    lo, hi = int(lower.get(d.name, 0)), int(upper[d.name])
                    ana.bind(d, tvm.ir.Range.from_min_extent(lo, hi - lo + 1))
    return ana


def _in_bounds(call, ana) -> bool:
    """Every sliced axis of a unit-stride ``strided_slice`` provably has
    ``0 <= begin <= end <= extent``."""
    from tvm import relax, tirx

    x, axes, begin, end = call.args[:4]
    strides = call.args[4] if len(call.args) > 4 else None
    shape = x.ty.shape.values if isinstance(x.ty, relax.TensorType) and x.ty.shape else None
    if shape is None:
        return False

    try:  # Tuples of PrimExprs (TVM 0.27: a PrimExpr is a Relax expression itself)
        axes_, begin_, end_ = list(axes), list(begin), list(end)
        strides_ = list(strides) if strides is not None else [1] * len(axes_)
    except TypeError:
        return False
    for a, b, e, st in zip(axes_, begin_, end_, strides_):
        if not (isinstance(st, (int, tirx.IntImm)) and int(st) == 1):
            return False
        dim = shape[int(a)]
        if not (ana.can_prove(b >= 0) and ana.can_prove(b <= e) and ana.can_prove(e <= dim)):
            return False
    return True


def simplify_bounded_shapes(mod):
    """Simplify ``main``'s shape expressions under the input dims' bounds
    (``tir_var_lower_bound``/``tir_var_upper_bound``): ``strided_slice`` calls provably in
    bounds get ``assume_inbound=True`` (their extent is then ``end - begin``, not
    ``min(end, extent) - begin``), and every ``R.shape`` is simplified. Returns a new module;
    types are re-inferred from the rewritten calls."""
    from tvm import relax

    main = mod["main"]
    ana = _analyzer(main)

    @relax.expr_functor.mutator
    class _Simplify(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.strided_slice":
                return call
            if call.attrs.assume_inbound or not _in_bounds(call, ana):
                return call
            x, axes, begin, end = call.args[:4]
            strides = call.args[4] if len(call.args) > 4 else None
            return relax.op.strided_slice(x, axes, begin, end, strides, assume_inbound=True)

        def visit_shape_expr_(self, op):
            values = [ana.simplify(v) for v in op.values]
            if all(str(a) == str(b) for a, b in zip(op.values, values)):
                return op
            return relax.ShapeExpr(values)

    rewriter = _Simplify(mod)
    rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(main))
    return rewriter.builder_.get()
