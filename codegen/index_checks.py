"""Bounds checks on index inputs, compiled into the artifact.

Runs on the lowered module (:mod:`.lower`), before masks, sparse rewrite and :mod:`.build`.
TVM's ``take`` (what ``nn.Embedding``, ONNX ``Gather`` and ``index_select`` import as) defaults
to ``mode="fast"``: no bounds check, so an out-of-range token id read another weight row (ids
-1, 150, 1000 gave garbage) or unmapped memory (id 100000 killed the process). PyTorch raises
``IndexError`` there.

Every gather whose indices depend on a model input gets them routed through a small PrimFunc
that copies them and asserts ``0 <= i < extent`` per element: a TIR ``assert``, so the check
lives in ``model.so`` and any TVM-runtime user of the artifact gets an error (a ``TVMError``
naming the input), never garbage or a crash. The gathers: ``take`` (``mode="fast"``),
``gather_elements`` (``torch.gather``, ONNX ``GatherElements``), ``index_tensor`` (torch's
``w[i, j]``: one check per index tensor, on the axis it indexes; negative indices count from
the end as in PyTorch, which TVM's ``adv_index`` does not do, so the check also normalises
them) and ``gather_nd`` (ONNX ``GatherND``: one check per index column, each against its own
axis, the columns concatenated back). An extent that is symbolic (an index into an activation
of dynamic sequence length) is passed to the check as a scalar argument. The copy costs one
pass over the ids (a few thousand integers), nothing next to the gather it feeds. The function
carries ``tirx.is_scheduled`` (our rules, dlight and MetaSchedule leave it alone) and
``op_pattern = kOpaque`` (``FuseOps`` does not fuse it into the gather).

ONNX ``Gather``/``GatherElements``/``GatherND`` allow negative indices; the ONNX importer
normalises them (``i + extent``) before the gather, so the check sees the normalised value and
ONNX semantics are kept. A take whose ``mode`` is ``clip``/``wrap``/``nan`` (defined for
out-of-range ids) is left unchecked.

The manifest records each checked index under ``index_inputs`` (input, allowed range, the
indexed tensor and axis, and whether the input reaches the gather unchanged, ``direct``): the loader
(:mod:`graphprune.runtime`) checks direct ones before the call too, so its error can show the
offending value.
"""

from __future__ import annotations

from graphprune.codegen.lower import LoweredModel, num_inputs

from graphprune.runtime import INDEX_CHECK_PREFIX

__all__ = ["INDEX_CHECK_PREFIX", "check_index_inputs"]

_OPAQUE = 8  # relax's OpPatternKind::kOpaque
# Ops an index input may pass through and still be "direct" (values unchanged).
_VALUE_PRESERVING = {
    "relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten",
    "relax.permute_dims", "relax.broadcast_to",
}  # fmt: skip


# Ops that keep the elements' row-major order (and integer value): the flat ids before them are
# the flat ids after them.
_ORDER_PRESERVING = ("astype", "reshape", "expand_dims", "squeeze", "flatten")


def _flat_source(idx, producers, ops):
    """The earliest integer var whose flattened values equal ``idx``'s, walking back through
    :data:`_ORDER_PRESERVING` ops."""
    cur = idx
    while True:
        prod = producers.get(cur)
        if prod is None or not any(getattr(prod, "op", None) is not None and prod.op.same_as(o)
                                   for o in ops):  # fmt: skip
            return cur
        src = prod.args[0]
        ty = getattr(src, "ty", None)
        if ty is None or ty.shape is None or not str(ty.dtype).startswith(("int", "uint")):
            return cur
        cur = src


def _check_func(dtype: str, extent, message: str, wrap: bool = False):
    """``out = idx`` over a flat ``idx`` of ``dtype``, asserting ``0 <= idx[i] < extent``;
    with ``wrap`` (PyTorch's advanced indexing), ``-extent <= idx[i] < extent`` and a negative
    index counts from the end (``out = idx + extent``).

    A constant ``extent`` is baked in; a symbolic one (``None`` here) is the PrimFunc's scalar
    parameter, passed by ``call_tir`` as a ``PrimValue`` of the shape it indexes."""
    from tvm.script import tirx as T

    # Block form (s_tir): Relax's pattern analyses (HasReshapePattern) require a root block.
    if extent is not None:

        @T.prim_func(private=True, s_tir=True)
        def check(a: T.handle, b: T.handle):
            n = T.int64()
            idx = T.match_buffer(a, (n,), dtype)
            out = T.match_buffer(b, (n,), dtype)
            for i in range(n):
                with T.sblock("index_check"):
                    vi = T.axis.spatial(n, i)
                    T.reads(idx[vi])
                    T.writes(out[vi])
                    v = T.Cast("int64", idx[vi])
                    size = T.int64(extent)
                    assert (v >= -size if wrap else v >= T.int64(0)) and v < size, message
                    out[vi] = T.Select(v < T.int64(0), idx[vi] + T.Cast(dtype, size), idx[vi])

    else:

        @T.prim_func(private=True, s_tir=True)
        def check(a: T.handle, size: T.int64, b: T.handle):
            n = T.int64()
            idx = T.match_buffer(a, (n,), dtype)
            out = T.match_buffer(b, (n,), dtype)
            for i in range(n):
                with T.sblock("index_check"):
                    vi = T.axis.spatial(n, i)
                    T.reads(idx[vi])
                    T.writes(out[vi])
                    v = T.Cast("int64", idx[vi])
                    assert (v >= -size if wrap else v >= T.int64(0)) and v < size, message
                    out[vi] = T.Select(v < T.int64(0), idx[vi] + T.Cast(dtype, size), idx[vi])

    return check.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", _OPAQUE)


def _dependencies(main):
    """``(deps, direct, producers)``: for each bound var the set of model-input indices it
    depends on, whether it is one input passed through value-preserving ops only, and its
    binding value."""
    import tvm
    from tvm import relax

    inputs = list(main.params[: num_inputs(main)])
    deps = {v: {i} for i, v in enumerate(inputs)}
    direct = {v: True for v in inputs}
    producers = {}
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            free = [v for v in relax.analysis.free_vars(value) if v in deps]
            var = binding.var
            deps[var] = set().union(*(deps[v] for v in free)) if free else set()
            producers[var] = value
            direct[var] = (
                isinstance(value, relax.Call)
                and isinstance(value.op, tvm.ir.Op)
                and value.op.name in _VALUE_PRESERVING
                and len(free) == 1
                and direct.get(free[0], False)
            )
    return deps, direct, producers


def _indexed_operands(call, tuples):
    """``[(index expr, axis of data it indexes)]`` of a gather ``call``, or ``[]`` for other
    calls and for gathers left unchecked (``take`` with ``mode`` other than ``fast``)."""
    from tvm import relax

    name = getattr(call.op, "name", "")
    if name == "relax.take":
        if str(call.attrs.mode) != "fast":  # clip / wrap / nan define out-of-range ids
            return []
        axis = int(call.attrs.axis) if call.attrs.axis is not None else 0
        return [(call.args[1], axis)]
    if name == "relax.gather_elements":
        return [(call.args[1], int(call.attrs.axis))]
    if name == "relax.index_tensor":
        fields = call.args[1]
        fields = tuples.get(fields, fields)
        if not isinstance(fields, relax.Tuple):
            return []
        return [(f, axis) for axis, f in enumerate(fields.fields)]
    if name == "relax.gather_nd":
        idx = call.args[1]
        shape = idx.ty.shape.values if idx.ty.shape is not None else None
        if not shape or not hasattr(shape[-1], "value"):
            return []
        batch_dims = int(call.attrs.batch_dims)
        return [((idx, m), batch_dims + m) for m in range(int(shape[-1]))]
    return []


def _dim_names(lowered) -> dict[str, str]:
    """Relax's name of each symbolic input dim (``s77``) -> the user's (``seq``)."""
    from tvm import tirx

    main = lowered.mod["main"]
    names = {}
    for var, spec in zip(main.params[: num_inputs(main)], lowered.inputs):
        for d, user in zip(var.ty.shape.values if var.ty.shape is not None else (), spec.shape):
            if isinstance(d, tirx.Var) and isinstance(user, str):
                names[d.name] = user
    return names


def _extent_text(extent, dim_names: dict[str, str]) -> str:
    import re

    text = str(extent.value if hasattr(extent, "value") else extent)
    return re.sub(r"\b\w+\b", lambda m: dim_names.get(m.group(0), m.group(0)), text)


def check_index_inputs(lowered: LoweredModel) -> tuple[LoweredModel, list[dict]]:
    """Guard every input-dependent index of a gather of ``lowered`` (``take``,
    ``gather_elements``, ``gather_nd``, ``index_tensor``) with an in-module bounds check.

    Returns the rewritten model (a new ``IRModule``; ``lowered`` is untouched) and the manifest
    records, one per checked index operand: ``{"input", "range": [0, extent], "indexes",
    "axis", "direct"}``; a symbolic extent is written as its expression in the user's
    dim names (``[0, "seq"]``), and such a record is never ``direct`` (the loader compares
    numbers).

    Examples
    --------
    >>> import torch
    >>> from graphprune.codegen.lower import lower_torch
    >>> emb = torch.nn.Embedding(10, 4)
    >>> lowered = lower_torch(emb, (torch.tensor([[1, 2]]),))
    >>> _, records = check_index_inputs(lowered)
    >>> [(r["input"], r["range"]) for r in records]
    [('input', [0, 10])]
    """
    import dataclasses

    import tvm
    from tvm import relax, tirx

    main = lowered.mod["main"]
    if not isinstance(main.body, relax.SeqExpr) or num_inputs(main) == 0:
        return lowered, []
    deps, direct, producers = _dependencies(main)
    tuples = {v: e for v, e in producers.items() if isinstance(e, relax.Tuple)}
    ops = {tvm.ir.Op.get(f"relax.{n}") for n in _ORDER_PRESERVING}
    names = [s.name for s in lowered.inputs]
    dim_names = _dim_names(lowered)
    weight_names = dict(zip(main.params[num_inputs(main) :], lowered.param_names or []))
    records: list[dict] = []

    @relax.expr_functor.mutator
    class _Guard(relax.PyExprMutator):
        def _column(self, idx, m):
            """Column ``m`` of a ``gather_nd`` index (its last axis), keeping the rank."""
            rank = len(idx.ty.shape.values)
            return self.builder_.emit(relax.op.strided_slice(idx, [rank - 1], [m], [m + 1]))

        def _guarded(self, call, data, idx, axis, column):
            """``idx`` (or its ``column``) routed through a check against
            ``data.shape[axis]``; ``None`` where it does not depend on an input."""
            used = deps.get(idx, set())
            shape = data.ty.shape.values if data.ty.shape is not None else None
            if not used or shape is None or len(shape) <= axis or idx.ty.shape is None:
                return None
            extent = shape[axis]
            fixed = isinstance(extent, tirx.IntImm)
            inputs = ", ".join(repr(names[i]) for i in sorted(used))
            indexed = weight_names.get(data, data.name if isinstance(data, relax.Var) else "")
            bound = int(extent) if fixed else _extent_text(extent, dim_names)
            op = call.op.name.removeprefix("relax.")
            # torch's x[i, j] (index_tensor) counts negative indices from the end; TVM's
            # adv_index does not, so the check normalises them.
            wrap = op == "index_tensor"
            low = (-bound if fixed else f"-{bound}") if wrap else 0
            message = (
                f"{INDEX_CHECK_PREFIX}: input {inputs} has an index outside [{low}, {bound}) "
                f"({op} of {indexed or 'a tensor'} on axis {axis}); pass indices in range"
            )
            if column is None:
                # The importers cast int64 ids to int32 (and reshape them) before take: check
                # the ids before that cast, so 2**32 + 5 is refused rather than read as 5.
                target = _flat_source(idx, producers, ops)
            else:
                target = self._column(idx, column)
            dtype = str(target.ty.dtype)
            func = _check_func(dtype, int(extent) if fixed else None, message, wrap)
            gv = self.builder_.add_func(func, "index_check")
            flat = self.builder_.emit(relax.op.reshape(target, [-1]))
            out_ty = relax.TensorType(flat.ty.shape, dtype)
            args = [flat] if fixed else [flat, relax.prim_value(extent)]
            checked = self.builder_.emit(relax.call_tir(gv, args, out_ty))
            if dtype != str(idx.ty.dtype):
                checked = self.builder_.emit(relax.op.astype(checked, str(idx.ty.dtype)))
            back = target.ty.shape if column is not None else idx.ty.shape
            records.append({
                "input": names[min(used)] if len(used) == 1 else sorted(names[i] for i in used),
                "range": [low, bound],
                "indexes": indexed,
                "axis": axis,
                "direct": fixed and column is None and bool(direct.get(idx)) and len(used) == 1,
            })  # fmt: skip
            return self.builder_.emit(relax.op.reshape(checked, back))

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            operands = _indexed_operands(call, tuples)
            if not operands:
                return call
            data = call.args[0]
            checked = []
            for operand, axis in operands:
                idx, column = operand if isinstance(operand, tuple) else (operand, None)
                checked.append(self._guarded(call, data, idx, axis, column))
            if all(c is None for c in checked):
                return call
            name = call.op.name
            if name == "relax.take":
                return relax.op.take(data, checked[0], call.attrs.axis, "fast")
            if name == "relax.gather_elements":
                return relax.op.gather_elements(data, checked[0], int(call.attrs.axis))
            if name == "relax.index_tensor":
                fields = [c if c is not None else f for c, (f, _) in zip(checked, operands)]
                return relax.op.index_tensor(data, fields)
            idx = call.args[1]  # gather_nd: the checked columns back together
            cols = [c if c is not None else self._column(idx, m) for m, c in enumerate(checked)]
            rank = len(idx.ty.shape.values)
            joined = self.builder_.emit(relax.op.concat(cols, axis=rank - 1))
            return relax.op.gather_nd(data, joined, int(call.attrs.batch_dims))

    guard = _Guard(lowered.mod)
    for gv, func in lowered.mod.functions_items():
        if isinstance(func, relax.Function) and gv.name_hint == "main":
            guard.builder_.update_func(gv, guard.visit_expr(func))
    if not records:
        return lowered, []
    return dataclasses.replace(lowered, mod=guard.builder_.get()), records
