"""Bounds checks on index inputs, compiled into the artifact.

Runs on the lowered module (:mod:`.lower`), before masks, sparse rewrite and :mod:`.build`.
TVM's ``take`` (what ``nn.Embedding``, ONNX ``Gather`` and ``index_select`` import as) defaults
to ``mode="fast"``: no bounds check, so an out-of-range token id read another weight row (ids
-1, 150, 1000 gave garbage) or unmapped memory (id 100000 killed the process). PyTorch raises
``IndexError`` there.

Every ``take`` whose indices depend on a model input gets its indices routed through a small
PrimFunc that copies them and asserts ``0 <= i < extent`` per element: a TIR ``assert``, so the
check lives in ``model.so`` and any TVM-runtime user of the artifact gets an error (a
``TVMError`` naming the input), never garbage or a crash. The copy costs one pass over the ids
(a few thousand integers), nothing next to the embedding it feeds. The function carries
``tirx.is_scheduled`` (our rules, dlight and MetaSchedule leave it alone) and
``op_pattern = kOpaque`` (``FuseOps`` does not fuse it into the gather).

ONNX ``Gather`` allows negative indices; the ONNX importer normalises them (``i + extent``)
before ``take``, so the check sees the normalised value and ONNX semantics are kept. A take
whose indexed extent is symbolic, or whose ``mode`` is ``clip``/``wrap``/``nan`` (defined for
out-of-range ids), is left unchecked.

The manifest records each checked take under ``index_inputs`` (input, allowed range, the
indexed weight, and whether the input reaches the take unchanged, ``direct``): the loader
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


def _check_func(dtype: str, extent: int, message: str):
    """``out = idx`` over a flat ``idx`` of ``dtype``, asserting ``0 <= idx[i] < extent``."""
    from tvm.script import tirx as T

    # Block form (s_tir): Relax's pattern analyses (HasReshapePattern) require a root block.
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
                assert T.Cast("int64", idx[vi]) >= T.int64(0) and T.Cast(
                    "int64", idx[vi]
                ) < T.int64(extent), message
                out[vi] = idx[vi]

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


def check_index_inputs(lowered: LoweredModel) -> tuple[LoweredModel, list[dict]]:
    """Guard every input-dependent ``take`` of ``lowered`` with an in-module bounds check.

    Returns the rewritten model (a new ``IRModule``; ``lowered`` is untouched) and the manifest
    records, one per checked take: ``{"input", "range": [0, extent], "indexes", "axis",
    "direct"}``.

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
    ops = {tvm.ir.Op.get(f"relax.{n}") for n in _ORDER_PRESERVING}
    names = [s.name for s in lowered.inputs]
    weight_names = dict(zip(main.params[num_inputs(main) :], lowered.param_names or []))
    take = tvm.ir.Op.get("relax.take")
    records: list[dict] = []

    @relax.expr_functor.mutator
    class _Guard(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(take)):
                return call
            data, idx = call.args
            used = deps.get(idx, set())
            if not used or str(call.attrs.mode) != "fast":
                return call
            axis = int(call.attrs.axis) if call.attrs.axis is not None else 0
            shape = data.ty.shape.values if data.ty.shape is not None else None
            extent = shape[axis] if shape is not None and len(shape) > axis else None
            if not isinstance(extent, tirx.IntImm) or idx.ty.shape is None:
                return call
            inputs = ", ".join(repr(names[i]) for i in sorted(used))
            indexed = weight_names.get(data, data.name if isinstance(data, relax.Var) else "")
            message = (
                f"{INDEX_CHECK_PREFIX}: input {inputs} has an index outside [0, {int(extent)}) "
                f"(it indexes {indexed or 'a tensor'} on axis {axis}); pass ids in range"
            )
            # The importers cast int64 ids to int32 (and reshape them) before take: check the
            # ids before that cast, so 2**32 + 5 is refused rather than read as 5.
            target = _flat_source(idx, producers, ops)
            dtype = str(target.ty.dtype)
            gv = self.builder_.add_func(_check_func(dtype, int(extent), message), "index_check")
            flat = self.builder_.emit(relax.op.reshape(target, [-1]))
            checked = self.builder_.emit(
                relax.call_tir(gv, [flat], out_ty=relax.TensorType(flat.ty.shape, dtype))
            )
            if dtype != str(idx.ty.dtype):
                checked = self.builder_.emit(relax.op.astype(checked, str(idx.ty.dtype)))
            back = self.builder_.emit(relax.op.reshape(checked, idx.ty.shape))
            records.append({
                "input": names[min(used)] if len(used) == 1 else sorted(names[i] for i in used),
                "range": [0, int(extent)],
                "indexes": indexed,
                "axis": axis,
                "direct": bool(direct.get(idx, False)) and len(used) == 1,
            })  # fmt: skip
            return relax.op.take(data, back, call.attrs.axis, "fast")

    guard = _Guard(lowered.mod)
    for gv, func in lowered.mod.functions_items():
        if isinstance(func, relax.Function) and gv.name_hint == "main":
            guard.builder_.update_func(gv, guard.visit_expr(func))
    if not records:
        return lowered, []
    return dataclasses.replace(lowered, mod=guard.builder_.get()), records
