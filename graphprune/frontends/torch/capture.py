"""PyTorch frontend: ``nn.Module`` + example inputs → :class:`~graphprune.ir.PruneGraph`.

Capture goes through ``torch.export`` (the pre-dispatch ATen graph, where ``linear``, ``conv2d``,
``layer_norm`` and ``scaled_dot_product_attention`` stay whole). Where export fails, the model is
first flattened with ``torch.fx.symbolic_trace`` and the traced ``GraphModule`` exported; the graph
records which route was taken in ``capture_method``. The user's module is never modified: export
runs on a deep copy.

Each ATen op is normalised by ``ATEN_RULES`` (target name → kind + attribute reader); ops not in
the table get kind ``"unknown"`` and the coupling pass freezes whatever flows through them.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np
import torch

from graphprune.frontends.torch import dynamic
from graphprune.frontends.torch.arrays import as_numpy
from graphprune.frontends.torch.nodes import aten_name
from graphprune.frontends.torch.source import TorchSource
from graphprune.ir.errors import CaptureError
from graphprune.ir import OpNode, PruneGraph, Value


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _rank(node: torch.fx.Node, i: int = 0) -> int:
    return len(_meta_shape(node.args[i]) or ())


def _axis(node: torch.fx.Node, a: int, rank: int | None = None) -> int:
    r = _rank(node) if rank is None else rank
    return a % r if r else a


def _perm_transpose(n: torch.fx.Node) -> dict:
    r = _rank(n)
    perm = list(range(r))
    if r >= 2:
        d0, d1 = (_axis(n, _arg(n, 1, "dim0", 0)), _axis(n, _arg(n, 2, "dim1", 1)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return {"perm": perm}


def _reduce_attrs(n: torch.fx.Node) -> dict:
    dims = _arg(n, 1, "dim", None)
    r = _rank(n)
    if dims is None:
        dims = list(range(r))
    elif isinstance(dims, int):
        dims = [dims]
    return {"axes": sorted(_axis(n, d) for d in dims), "keepdim": bool(_arg(n, 2, "keepdim", False))}


def _conv_attrs(n: torch.fx.Node) -> dict:
    return {"groups": int(_arg(n, 6, "groups", 1))}


def _convt_attrs(n: torch.fx.Node) -> dict:
    return {"groups": int(_arg(n, 6, "groups", 1))}


def _slice_attrs(n: torch.fx.Node) -> dict:
    shape = _meta_shape(n.args[0])
    axis = _axis(n, _arg(n, 1, "dim", 0))
    size = shape[axis]
    start, end, step = (_concrete(_arg(n, 2, "start", None)), _concrete(_arg(n, 3, "end", None)),
                        _concrete(_arg(n, 4, "step", 1)))  # fmt: skip
    start, end, _ = slice(start, end, step).indices(size)
    return {"axis": axis, "start": start, "end": max(end, start), "step": step}


def _narrow_attrs(n: torch.fx.Node) -> dict:
    axis = _axis(n, n.args[1])
    size = _meta_shape(n.args[0])[axis]
    start, length = _concrete(n.args[2]), _concrete(n.args[3])
    start = start % size if start < 0 else start
    return {"axis": axis, "start": start, "end": start + length, "step": 1}


def _sdpa_attrs(n: torch.fx.Node) -> dict:
    return {"scale": _arg(n, 6, "scale", None), "enable_gqa": bool(n.kwargs.get("enable_gqa", False))}


def _const(kind: str, **attrs: Any) -> Callable[[torch.fx.Node], tuple[str, dict]]:
    return lambda n: (kind, dict(attrs))


def _with(kind: str, fn: Callable[[torch.fx.Node], dict]) -> Callable:
    return lambda n: (kind, fn(n))


_UNARY = """relu relu_ gelu silu silu_ sigmoid tanh hardtanh hardtanh_ relu6 hardswish hardswish_
hardsigmoid leaky_relu elu softplus mish neg exp log sqrt rsqrt abs clamp clamp_min clamp_max
dropout dropout_ clone contiguous alias detach lift_fresh_copy sin cos erf reciprocal square
_to_copy to type_as lift_fresh pow logical_not bitwise_not sign floor ceil round fill_""".split()
_BINARY = {"add": "add", "add_": "add", "sub": "sub", "rsub": "sub", "mul": "mul", "mul_": "mul",
           "div": "div", "div_": "div", "maximum": "maximum", "minimum": "minimum",
           "where": "where", "masked_fill": "where", "eq": "elementwise", "ne": "elementwise",
           "lt": "elementwise", "le": "elementwise", "gt": "elementwise", "ge": "elementwise",
           "logical_and": "elementwise", "logical_or": "elementwise", "bitwise_and": "elementwise",
           "bitwise_or": "elementwise", "floor_divide": "elementwise", "remainder": "elementwise",
           "atan2": "elementwise"}  # fmt: skip

# ATen op name (without the "aten." prefix and overload) → (kind, attrs).
ATEN_RULES: dict[str, Callable[[torch.fx.Node], tuple[str, dict]]] = {
    **{u: _const("activation") for u in _UNARY},
    **{b: _const(k) for b, k in _BINARY.items()},
    "conv1d": _with("conv", _conv_attrs),
    "conv2d": _with("conv", _conv_attrs),
    "conv3d": _with("conv", _conv_attrs),
    "conv_transpose1d": _with("conv_transpose", _convt_attrs),
    "conv_transpose2d": _with("conv_transpose", _convt_attrs),
    "conv_transpose3d": _with("conv_transpose", _convt_attrs),
    "linear": _const("linear", w_layout="oi"),
    "addmm": _const("linear", w_layout="io", slots=(1, 2, 0)),
    "matmul": _const("matmul"),
    "outer": _const("outer"),
    "ger": _const("outer"),
    "mm": _const("matmul"),
    "bmm": _const("matmul"),
    "embedding": _const("embedding"),
    "batch_norm": _const("batch_norm"),
    "_native_batch_norm_legit_no_training": _const("batch_norm"),
    "layer_norm": _with("layer_norm", lambda n: {"normalized_ndim": len(n.args[1])}),
    "rms_norm": _with("layer_norm", lambda n: {"normalized_ndim": len(n.args[1]), "rms": True}),
    "group_norm": _with("group_norm", lambda n: {"num_groups": int(n.args[1])}),
    "instance_norm": _const("instance_norm"),
    "cat": _with("cat", lambda n: {"axis": _axis(n, _arg(n, 1, "dim", 0), len(_meta_shape(n)))}),
    "concat": _with("cat", lambda n: {"axis": _axis(n, _arg(n, 1, "dim", 0), len(_meta_shape(n)))}),
    "stack": _with("stack", lambda n: {"axis": _arg(n, 1, "dim", 0) % len(_meta_shape(n))}),
    "split": _with("split", lambda n: {"axis": _axis(n, _arg(n, 2, "dim", 0))}),
    "split_with_sizes": _with("split", lambda n: {"axis": _axis(n, _arg(n, 2, "dim", 0))}),
    "chunk": _with("split", lambda n: {"axis": _axis(n, _arg(n, 2, "dim", 0))}),
    "unbind": _with("unbind", lambda n: {"axis": _axis(n, _arg(n, 1, "dim", 0))}),
    "slice": _with("slice", _slice_attrs),
    "narrow": _with("slice", _narrow_attrs),
    "select": _with("select", lambda n: {"axis": _axis(n, n.args[1]), "index": n.args[2]}),
    "view": _const("reshape"),
    "reshape": _const("reshape"),
    "_unsafe_view": _const("reshape"),
    "flatten": _const("reshape"),
    "unflatten": _const("reshape"),
    "squeeze": _const("reshape"),
    "unsqueeze": _const("reshape"),
    "view_as": _const("reshape"),
    "reshape_as": _const("reshape"),
    "permute": _with("permute", lambda n: {"perm": [_axis(n, d) for d in n.args[1]]}),
    "transpose": _with("permute", _perm_transpose),
    "t": _with("permute", lambda n: {"perm": list(range(_rank(n)))[::-1]}),
    "numpy_T": _with("permute", lambda n: {"perm": list(range(_rank(n)))[::-1]}),
    "expand": _const("expand"),
    "expand_as": _const("expand"),
    "repeat": _const("repeat"),
    "repeat_interleave": _with("repeat", lambda n: {"interleave": True, "axis": _arg(n, 2, "dim")}),
    "max_pool1d": _const("pool"),
    "max_pool2d": _const("pool"),
    "max_pool3d": _const("pool"),
    "avg_pool1d": _const("pool"),
    "avg_pool2d": _const("pool"),
    "avg_pool3d": _const("pool"),
    "adaptive_avg_pool1d": _const("pool"),
    "adaptive_avg_pool2d": _const("pool"),
    "adaptive_max_pool2d": _const("pool"),
    "upsample_nearest2d": _const("pool"),
    "upsample_bilinear2d": _const("pool"),
    "_upsample_nearest_exact2d": _const("pool"),
    "pad": _const("pad"),
    "constant_pad_nd": _const("pad"),
    "mean": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "mean"}),
    "sum": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "sum"}),
    "amax": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "max"}),
    "amin": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "min"}),
    "var": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "var"}),
    "std": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "std"}),
    "norm": _with("reduce", lambda n: {**_reduce_attrs(n), "op": "norm"}),
    "softmax": _with("softmax", lambda n: {"axis": _axis(n, n.args[1])}),
    "_softmax": _with("softmax", lambda n: {"axis": _axis(n, n.args[1])}),
    "log_softmax": _with("softmax", lambda n: {"axis": _axis(n, n.args[1])}),
    "scaled_dot_product_attention": _with("sdpa", _sdpa_attrs),
    "arange": _const("creation"),
    "zeros": _const("creation"),
    "ones": _const("creation"),
    "full": _const("creation"),
    "empty": _const("creation"),
    "scalar_tensor": _const("creation"),
    "zeros_like": _const("creation"),
    "ones_like": _const("creation"),
    "full_like": _const("creation"),
    "new_zeros": _const("creation"),
    "new_ones": _const("creation"),
    "tril": _const("activation"),
    "triu": _const("activation"),
}

# Ops that only carry metadata (no tensor semantics); dropped from the graph but their output
# aliases their input.
_PASSTHROUGH = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def _meta_shape(n: Any) -> tuple[int, ...] | None:
    if not isinstance(n, torch.fx.Node):
        return None
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return _shape_of(v)
    return None


def _shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """Sizes at the example inputs (a symbolic size's hint)."""
    return tuple(dynamic.hint(s) for s in t.shape)


def _concrete(a: Any) -> Any:
    """An argument with symbolic sizes (fx nodes of SymInts) replaced by their example values."""
    if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.SymInt):
        return dynamic.hint(a.meta["val"])
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


def _dtype_str(t: Any) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else "unknown"


_SCHEMA_ARGS: dict[Any, list[tuple[str, Any]]] = {}


def _schema_args(target: Any) -> list[tuple[str, Any]] | None:
    if target not in _SCHEMA_ARGS:
        schema = getattr(target, "_schema", None)
        _SCHEMA_ARGS[target] = None if schema is None else [
            (a.name, a.default_value if a.has_default_value() else None) for a in schema.arguments]
    return _SCHEMA_ARGS[target]


def _positional(node: torch.fx.Node) -> list[Any]:
    """The op's arguments by schema position (keyword arguments moved to their position)."""
    args = list(node.args)
    schema = _schema_args(node.target)
    if schema is not None:
        for name, default in schema[len(args):]:
            args.append(node.kwargs.get(name, default))
    else:
        args.extend(node.kwargs.values())
    return args


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _tensor_slots(node: torch.fx.Node) -> list[torch.fx.Node | None]:
    """Input slots of an op: slot i is positional argument i when that is a tensor (else None);
    a leading list of tensors (cat, stack) takes slots 0..k-1 and nothing else is a tensor."""
    args = _positional(node)
    if args and isinstance(args[0], (list, tuple)) and any(_is_tensor_node(a) for a in args[0]):
        return [a if _is_tensor_node(a) else None for a in args[0]]
    return [a if _is_tensor_node(a) else None for a in args]


def _export(model: torch.nn.Module, args: tuple, kwargs: dict,
            spec: Any = None) -> tuple[Any, str]:  # fmt: skip
    # Under no_grad, `torch.no_grad()` regions inside the model (HF rotary embeddings) stay plain
    # ops instead of `wrap_with_set_grad_enabled` subgraphs the coupling table cannot see into.
    # Source stack traces on every node cost a quarter of the export time; messages name nodes.
    import torch.fx.config as fx_config

    saved = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        with torch.no_grad():
            return _export_inner(model, args, kwargs, spec)
    finally:
        fx_config.do_not_emit_stack_traces = saved


def _export_inner(model: torch.nn.Module, args: tuple, kwargs: dict, spec: Any) -> tuple[Any, str]:
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
        return ep, "torch.export"
    except Exception as e_export:  # noqa: BLE001 - any export failure triggers the fx route
        if spec is not None and dynamic.is_constraint_error(e_export):
            raise dynamic.Specialised(str(e_export)) from e_export
        if spec is not None and "dynamic_shapes" in str(e_export):
            raise CaptureError(
                f"dynamic_shapes= does not fit {type(model).__name__}'s inputs: "
                f"{_first_line(e_export).split(' For more information')[0]} Pass torch.export's format: a Dim per input axis, "
                "keyed by the forward's argument names (or a tuple in their order).") from e_export
        try:
            traced = torch.fx.symbolic_trace(model)
            ep = torch.export.export(traced, args, kwargs, dynamic_shapes=spec, strict=False)
            return ep, "torch.fx.symbolic_trace -> torch.export"
        except Exception as e_fx:  # noqa: BLE001
            if spec is not None and dynamic.is_constraint_error(e_fx):
                raise dynamic.Specialised(str(e_fx)) from e_fx
            raise CaptureError(
                f"could not capture {type(model).__name__}: torch.export failed with "
                f"{type(e_export).__name__}: {_first_line(e_export)}; torch.fx.symbolic_trace "
                f"also failed with {type(e_fx).__name__}: {_first_line(e_fx)}. Data-dependent "
                "control flow (Python `if` on tensor values) cannot be captured: rewrite it with "
                "torch.cond/torch.where, or capture the submodule that has none."
            ) from e_export


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""


def capture_torch(model: torch.nn.Module, example_inputs: Any, name: str | None = None,
                  dynamic_shapes: Any = None) -> PruneGraph:  # fmt: skip
    """Capture ``model`` (never modified) into a PruneGraph through torch.export.

    ``dynamic_shapes`` is torch.export's own (``torch.export.Dim`` per input axis); without it
    batch, and the sequence axis of integer inputs, are dynamic where the model allows (see
    :mod:`graphprune.frontends.torch.dynamic`); ``False`` captures every axis static. ``pg.dynamic_axes`` lists what stayed dynamic,
    ``pg.static_axes`` what fell back to static and why."""
    if example_inputs is None:
        raise CaptureError(
            f"capturing a torch model ({type(model).__name__}) needs example_inputs: pass a tuple "
            "of tensors shaped like a real batch (batch size >= 2, so it is not specialised)."
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {}
    if isinstance(example_inputs, dict):
        example_inputs, kwargs = (), dict(example_inputs)
    args = tuple(example_inputs)
    # Export reads the module without changing it; only a module in training mode is copied, so
    # that switching it to eval mode leaves the user's object alone.
    work = copy.deepcopy(model).eval() if model.training else model
    if dynamic_shapes is None:
        request = dynamic.default_request(work, args, kwargs)
    elif dynamic_shapes is False:
        request = None  # every axis static, at the example sizes
    else:
        request = dynamic.explicit_request(dynamic_shapes)
    try:
        ep, method = dynamic.export_dynamic(lambda spec: _export(work, args, kwargs, spec), request)
    except CaptureError as e:
        _check_inputs(work, args, kwargs, e)
        raise
    pg = _from_exported(ep, method, name or type(model).__name__, args, kwargs)
    if request is not None:
        pg.static_axes = dict(request.static)
        pg.dynamic_axes = request.annotate(pg.dynamic_axes)
    pg.aliases = _aliases(model, pg.weights)
    return pg


def _aliases(model: torch.nn.Module, weights: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """For each captured parameter name, the model's other names of the same tensor.

    torch.export keeps one name of a tied tensor or several (each its own placeholder) depending on
    how the model ties it; either way every name maps to the others."""
    by_tensor: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for n, t in named:
        by_tensor.setdefault(id(t), []).append(n)
    return {n: tuple(o for o in names if o != n)
            for names in by_tensor.values() if len(names) > 1 for n in names if n in weights}


def _check_inputs(model: torch.nn.Module, args: tuple, kwargs: dict, cause: Exception) -> None:
    """After a failed export: if the model fails eagerly on the inputs, say that instead."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise CaptureError(
            f"{type(model).__name__} fails on the example inputs (shapes {shapes}): "
            f"{type(e).__name__}: {_first_line(e)}. Pass example_inputs the model accepts."
        ) from cause


def _from_exported(ep: Any, method: str, name: str, args: tuple, kwargs: dict) -> PruneGraph:
    pg = PruneGraph("torch", method, name)
    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    param_of.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    user_inputs = set(sig.user_inputs)
    vid: dict[str, str] = {}  # fx node name → value id
    param_value: dict[str, str] = {}  # parameter / buffer name → value id
    multi: dict[str, list[str]] = {}  # fx node name → its output value ids (tuple results)
    taken = set()
    pg.dynamic_axes, names = dynamic.axes_of(ep, [
        (n.name, n.meta["val"]) for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in user_inputs
        and isinstance(n.meta.get("val"), torch.Tensor)])  # fmt: skip

    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if node.name in param_of:
            pname = param_of[node.name]
            t = state[pname]
            pid = pname if pname not in taken else f"param:{pname}"
            pg.add_value(pid, Value(tuple(t.shape), _dtype_str(t), "param", param=pname,
                                    trainable=node.name in sig.inputs_to_parameters))
            arr = as_numpy(t).view()  # bf16 as ml_dtypes.bfloat16 over the same bytes: no copy
            arr.flags.writeable = False  # a view of the user's weights: passes must not write
            pg.weights[pname] = arr
            vid[node.name] = pid
            param_value[pname] = pid
        elif node.name in user_inputs and isinstance(val, torch.Tensor):
            pg.add_value(node.name, Value(_shape_of(val), _dtype_str(val), "input",
                                          symbols=dynamic.symbols_of(val, names)))
            pg.inputs.append(node.name)
            vid[node.name] = node.name
        taken.add(vid.get(node.name, node.name))

    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        aname = aten_name(node.target)
        if aname in _PASSTHROUGH:
            continue
        if aname == "getitem":
            src, idx = node.args
            if src.name in multi:
                vid[node.name] = multi[src.name][idx]
                continue
        val = node.meta.get("val")
        rule = ATEN_RULES.get(aname)
        try:
            kind, attrs = rule(node) if rule else ("unknown", {})
        except Exception:  # noqa: BLE001 - an odd signature: keep the op, but opaque
            kind, attrs = "unknown", {}
        attrs["aten"] = aname
        inputs = [vid[a.name] if a is not None and a.name in vid else None
                  for a in _tensor_slots(node)]  # fmt: skip
        if isinstance(val, torch.Tensor):
            out_id = "%" + node.name
            pg.add_value(out_id, Value(_shape_of(val), _dtype_str(val),
                                       symbols=dynamic.symbols_of(val, names)))
            outputs = [out_id]
            vid[node.name] = out_id
        elif isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
            outputs = []
            for i, v in enumerate(val):
                oid = f"%{node.name}.{i}"
                pg.add_value(oid, Value(_shape_of(v), _dtype_str(v),
                                        symbols=dynamic.symbols_of(v, names)))
                outputs.append(oid)
            multi[node.name] = outputs
        else:
            continue  # symbolic ints and other non-tensor results carry no channels
        pg.add_op(node.name, OpNode(kind, str(node.target), attrs), inputs, outputs)

    pg.source = TorchSource(ep, args, kwargs, value_of=vid, param_value=param_value)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_specs = sig.output_specs
    for spec, a in zip(out_specs, out_node.args[0]):
        if getattr(spec.kind, "name", "") != "USER_OUTPUT":
            continue
        if isinstance(a, torch.fx.Node) and a.name in vid:
            pg.outputs.append(vid[a.name])
            pg.value(vid[a.name]).role = "output" if pg.value(vid[a.name]).role == "activation" \
                else pg.value(vid[a.name]).role
    return pg


def example_numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape)) if shape else 1


__all__ = ["capture_torch", "ATEN_RULES", "np"]
