"""ONNX frontend: ``onnx.ModelProto`` or a ``.onnx`` path → :class:`~graphprune.ir.PruneGraph`.

The model is checked (``onnx.checker``), its symbolic input dims fixed and its shape subgraphs
folded (:mod:`~graphprune.frontends.onnx.shapes`), shape-inferred (``onnx.shape_inference``),
imported with onnx-graphsurgeon and its exporter idioms normalised
(:mod:`~graphprune.frontends.onnx.patterns`). ``ONNX_RULES`` maps each ``op_type`` onto the
same normalised kinds the torch frontend produces. Constant inputs that are *arguments* rather than data (a Reshape's
target shape, a Split's sizes, a Slice's bounds) are read into the op's attributes and do not
appear as tensor slots; float initializers that ops compute with become parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphprune.frontends.onnx.files import (
    INLINE_BYTES,
    annotate_shapes,
    check_model,
    load_onnx,
    skeleton,
    tensor_nbytes,
)
from graphprune.frontends.onnx.nodes import const_input
from graphprune.frontends.onnx.patterns import merge_chunk_slices
from graphprune.frontends.onnx.prepare import prepare
from graphprune.frontends.onnx.shapes import example_feeds
from graphprune.frontends.onnx.source import OnnxSource
from graphprune.frontends.onnx.symbols import record_dynamic
from graphprune.ir import OpNode, PruneGraph, Value
from graphprune.ir.errors import CaptureError

# Inputs that are arguments, not data, per op_type: they are never tensor slots in the IR.
ARG_SLOTS: dict[str, set[int]] = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Split": {1}, "Slice": {1, 2, 3, 4},
    "Squeeze": {1}, "Unsqueeze": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1},
    "ReduceMin": {1}, "ReduceL2": {1}, "ReduceSumSquare": {1}, "Resize": {1, 2, 3},
    "Pad": {1, 2, 3}, "Upsample": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2},
    "Clip": {1, 2}, "Dropout": {1, 2},
}  # fmt: skip

_UNARY = """Relu Sigmoid Tanh Gelu Erf Sqrt Reciprocal Neg Exp Log Clip LeakyRelu HardSigmoid
HardSwish Softplus Softsign Mish Identity Dropout Abs Not Floor Ceil Sin Cos Elu Selu Sign Round
Celu ThresholdedRelu Trilu IsNaN IsInf""".split()
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "maximum",
           "Min": "minimum", "Where": "where", "Equal": "elementwise", "Less": "elementwise",
           "Greater": "elementwise", "LessOrEqual": "elementwise", "GreaterOrEqual": "elementwise",
           "And": "elementwise", "Or": "elementwise", "Mod": "elementwise", "PRelu": "mul"}  # fmt: skip


def _rank(node: gs.Node, i: int = 0) -> int:
    s = node.inputs[i].shape
    return len(s) if s is not None else 0


def _norm_axis(a: int, r: int) -> int:
    return a % r if r else a


def _gemm(n: gs.Node) -> tuple[str, dict]:
    if n.attrs.get("transA", 0):
        return "unknown", {"why": "Gemm with transA"}
    return "linear", {"w_layout": "oi" if n.attrs.get("transB", 0) else "io"}


def _split(n: gs.Node) -> tuple[str, dict]:
    axis = _norm_axis(n.attrs.get("axis", 0), _rank(n))
    sizes = const_input(n, 1)
    if sizes is None and "split" in n.attrs:  # before opset 13 the sizes are an attribute
        sizes = np.asarray(n.attrs["split"])
    uniform = "num_outputs" in n.attrs or sizes is None
    return "split", {"axis": axis, "uniform": uniform}


def _slice(n: gs.Node) -> tuple[str, dict]:
    starts, ends = const_input(n, 1), const_input(n, 2)
    axes, steps = const_input(n, 3), const_input(n, 4)
    shape = n.inputs[0].shape
    if starts is None or ends is None or shape is None:
        return "unknown", {"why": "Slice with computed bounds"}
    r = len(shape)
    axes = list(range(len(starts))) if axes is None else [_norm_axis(int(a), r) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    changed = []
    for a, s, e, st in zip(axes, starts, ends, steps):
        size = shape[a]
        s0, e0, _ = slice(int(s), int(e) if e < 2**62 else None, st).indices(size)
        if (s0, e0, st) != (0, size, 1):
            changed.append((a, s0, max(e0, s0), st))
    if len(changed) != 1:
        return ("identity", {}) if not changed else ("unknown", {"why": "multi-axis Slice"})
    a, s0, e0, st = changed[0]
    return "slice", {"axis": a, "start": s0, "end": e0, "step": st}


def _gather(n: gs.Node) -> tuple[str, dict]:
    idx = const_input(n, 1)
    axis = _norm_axis(n.attrs.get("axis", 0), _rank(n))
    if isinstance(n.inputs[0], gs.Constant) and axis == 0:
        return "embedding", {}
    if idx is not None and idx.ndim == 0:
        return "select", {"axis": axis, "index": int(idx)}
    return "unknown", {"why": "Gather with tensor indices"}


def _reduce(op: str) -> Callable[[gs.Node], tuple[str, dict]]:
    def rule(n: gs.Node) -> tuple[str, dict]:
        r = _rank(n)
        axes = n.attrs.get("axes")
        if axes is None:
            c = const_input(n, 1)
            axes = c.tolist() if c is not None else list(range(r))
        return "reduce", {"axes": sorted(_norm_axis(int(a), r) for a in axes),
                          "keepdim": bool(n.attrs.get("keepdims", 1)), "op": op}  # fmt: skip

    return rule


def _k(kind: str, **attrs: Any) -> Callable[[gs.Node], tuple[str, dict]]:
    return lambda n: (kind, dict(attrs))


ONNX_RULES: dict[str, Callable[[gs.Node], tuple[str, dict]]] = {
    **{u: _k("activation") for u in _UNARY},
    **{b: _k(k) for b, k in _BINARY.items()},
    "Cast": _k("cast"), "CastLike": _k("cast"),
    "Conv": lambda n: ("conv", {"groups": int(n.attrs.get("group", 1))}),
    "ConvTranspose": lambda n: ("conv_transpose", {"groups": int(n.attrs.get("group", 1))}),
    "Gemm": _gemm,
    "MatMul": _k("matmul"),
    "BatchNormalization": _k("batch_norm"),
    "InstanceNormalization": _k("instance_norm"),
    "LayerNormalization": lambda n: ("layer_norm", {
        "normalized_ndim": _rank(n) - _norm_axis(n.attrs.get("axis", -1), _rank(n))}),
    "SimplifiedLayerNormalization": lambda n: ("layer_norm", {
        "normalized_ndim": _rank(n) - _norm_axis(n.attrs.get("axis", -1), _rank(n))}),
    "GroupNormalization": lambda n: ("group_norm", {"num_groups": int(n.attrs["num_groups"])}),
    "Concat": lambda n: ("cat", {"axis": _norm_axis(n.attrs["axis"], len(n.outputs[0].shape))}),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Reshape": _k("reshape"), "Flatten": _k("reshape"), "Squeeze": _k("reshape"),
    "Unsqueeze": _k("reshape"),
    "Transpose": lambda n: ("permute", {"perm": list(n.attrs.get("perm",
                                                                 range(_rank(n))[::-1]))}),
    "Expand": _k("expand"), "Tile": _k("repeat"),
    "MaxPool": _k("pool"), "AveragePool": _k("pool"), "GlobalAveragePool": _k("pool"),
    "GlobalMaxPool": _k("pool"), "Resize": _k("pool"), "Upsample": _k("pool"), "Pad": _k("pad"),
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceL2": _reduce("norm"),
    "ReduceSumSquare": _reduce("sum"),
    "Softmax": lambda n: ("softmax", {"axis": _norm_axis(n.attrs.get("axis", -1), _rank(n))}),
    "LogSoftmax": lambda n: ("softmax", {"axis": _norm_axis(n.attrs.get("axis", -1), _rank(n))}),
    "Shape": _k("creation"), "ConstantOfShape": _k("creation"), "Range": _k("creation"),
    "Size": _k("creation"), "EyeLike": _k("creation"),
}  # fmt: skip


def _dtype(t: gs.Tensor) -> str:
    try:
        return str(np.dtype(t.dtype))
    except TypeError:
        return str(t.dtype)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``model`` (capture's own folded copy, emptied here) imported into onnx-graphsurgeon with
    its large tensors as numpy arrays and nothing else holding their bytes: the graph is imported
    from the model's :func:`~graphprune.frontends.onnx.files.skeleton` and the arrays read from
    the model, whose bytes are then freed (a protobuf message frees nothing until it is dropped
    whole, and a graph imported from it keeps it alive)."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if tensor_nbytes(t) > INLINE_BYTES}  # fmt: skip
    shell = skeleton(model)
    del model.graph.initializer[:]
    graph = gs.import_onnx(shell)
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant) and name in arrays:
            t.values = arrays.pop(name)
    return graph


def capture_onnx(model_or_path: Any, name: str | None = None, example_inputs: Any = None,
                 dynamic_shapes: dict[str, tuple[int, int]] | None = None) -> PruneGraph:  # fmt: skip
    """Capture an ONNX model (never modified) into a PruneGraph.

    Symbolic input dims (``dim_param``) are fixed to the sizes of ``example_inputs`` (by name or
    position), else to 2 (within ``dynamic_shapes[dim] = (min, max)``, default ``(1, 64)``), for
    the analysis only; shape subgraphs are folded (:mod:`~graphprune.frontends.onnx.shapes`) and
    what is written back keeps the symbolic dims.
    """
    model, default_name = load_onnx(model_or_path)
    where = name or default_name
    try:
        check_model(model)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"ONNX model {where!r} fails onnx.checker: {e}. Fix or re-export it.") from e
    feeds = example_feeds(model, example_inputs)
    owned = not isinstance(model_or_path, onnx.ModelProto)  # loaded here: ours to fold in place
    folded, dynamic = prepare(model, feeds, dynamic_shapes, owned=owned)
    # A model loaded here is kept as its skeleton, and reloaded only if the original has to run
    # (a written model failed): one copy of the weights, the graph's, stays in memory.
    source_model = skeleton(model) if owned else model
    path = os.path.abspath(os.fspath(model_or_path)) if owned else None
    if folded is model and not owned:  # shapes are written into it, never into the user's
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    del model
    try:
        annotate_shapes(folded)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"ONNX shape inference fails on {where!r}: {e}") from e
    graph = import_graph(folded)
    del folded
    graph.cleanup().toposort()
    opset = next((o.version for o in source_model.opset_import if o.domain in ("", "ai.onnx")),
                 17)  # fmt: skip
    merge_chunk_slices(graph, opset)
    pg = PruneGraph("onnx", "onnx-graphsurgeon", where)
    const_uses: dict[tuple[str, int], str] = {}
    pg.source = OnnxSource(source_model, graph, const_uses, example_feeds=feeds, dynamic=dynamic,
                           path=path)  # fmt: skip

    def value_id(t: gs.Tensor) -> str:
        return t.name

    def ensure(t: gs.Tensor, role: str = "activation") -> str:
        vid = value_id(t)
        if vid in pg.nx:
            return vid
        if isinstance(t, gs.Constant):
            arr = np.asarray(t.values)
            pg.weights[t.name] = arr
            pg.add_value(vid, Value(tuple(arr.shape), str(arr.dtype), "param", param=t.name))
        else:
            shape = tuple(int(s) if isinstance(s, (int, np.integer)) else -1 for s in (t.shape or ()))
            if t.shape is None or any(s < 0 for s in shape):
                raise CaptureError(
                    f"tensor {t.name!r} in {where!r} has no static shape after folding the "
                    "shape computations and ONNX shape inference (produced by "
                    f"{t.inputs[0].op if t.inputs else 'no node'}); report the model."
                )
            pg.add_value(vid, Value(shape, _dtype(t), role))
        return vid

    tensor_names = set(graph.tensors())
    for t in graph.inputs:
        pg.inputs.append(ensure(t, "input"))
    for node in graph.nodes:
        if node.op == "Constant":
            continue
        rule = ONNX_RULES.get(node.op)
        try:
            kind, attrs = rule(node) if rule else ("unknown", {})
        except Exception:  # noqa: BLE001 - odd attributes: keep the op but opaque
            kind, attrs = "unknown", {}
        attrs["onnx"] = node.op
        if kind == "slice" and dynamic is not None and any(
                (node.name, s) in dynamic.affine for s in (1, 2)):  # fmt: skip
            attrs["symbolic_bounds"] = True  # rebuilt from the runtime shape when written
        arg_slots = ARG_SLOTS.get(node.op, set())
        op_id = node.name or f"{node.op}_{len(pg.nx)}"
        while op_id in pg.nx or op_id in tensor_names:  # ops and values share one namespace
            op_id += "_"
        if dynamic is not None and node.name and node.name != op_id:
            dynamic.rename(node.name, op_id)
        node.name = op_id
        inputs: list[str | None] = []
        for i, t in enumerate(node.inputs):
            arr = const_input(node, i)
            if i in arg_slots or t.name == "":
                inputs.append(None)
            elif arr is not None:
                # Exporters deduplicate equal initializers (every zero bias becomes one): a
                # constant is a value, so each use gets its own parameter and stays independent.
                vid = t.name if t.name not in pg.nx else f"{t.name}@{op_id}:{i}"
                pg.weights.setdefault(t.name, arr)
                pg.add_value(vid, Value(tuple(arr.shape), str(arr.dtype), "param", param=t.name))
                const_uses[(op_id, i)] = vid
                inputs.append(vid)
            else:
                inputs.append(ensure(t))
        if kind == "embedding":  # Gather(table, ids): table first, as torch's embedding
            inputs = inputs[:2]
        outputs = [ensure(t) for t in node.outputs]
        pg.add_op(op_id, OpNode(kind, node.op, attrs), inputs, outputs)
    for o in pg.ops():  # running statistics are state, not weights (as torch buffers)
        if pg.op(o).kind == "batch_norm":
            for v in pg.op_inputs(o)[3:5]:
                if v is not None and pg.value(v).role == "param":
                    pg.value(v).trainable = False
    for t in graph.outputs:
        vid = ensure(t)
        pg.outputs.append(vid)
        if pg.value(vid).role == "activation":
            pg.value(vid).role = "output"
    if dynamic is not None:
        record_dynamic(pg, dynamic, dynamic.probes, set(dynamic_shapes or {}))
    return pg
