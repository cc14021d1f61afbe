"""Write a :class:`~passes.removal.RemovalPlan` back to ONNX with onnx-graphsurgeon.

Initializers are sliced, tensor shapes updated, and argument inputs rewritten per op_type
(``ARG_REWRITES``: Reshape/Expand target shapes, Split sizes, Slice bounds, Conv ``group``,
GroupNormalization ``num_groups``). Argument constants are replaced by fresh ones, never edited
in place, because exporters share them between nodes. The result passes ``onnx.checker`` and a
strict shape inference whose shapes must equal the plan's, or :class:`VerificationError` names
the node at fault.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.frontends.onnx.files import check_model, infer_shapes
from graphprune.frontends.onnx.nodes import const_input
from graphprune.ir import PruneGraph
from graphprune.ir.errors import CaptureError, VerificationError
from graphprune.ir.plan import RemovalPlan, slice_array


class _Ctx:
    def __init__(self, pg: PruneGraph, plan: RemovalPlan):
        self.pg, self.plan = pg, plan
        self.counter = 0

    def shape(self, t: gs.Tensor) -> tuple[int, ...]:
        if t.name in self.plan.new_shapes:
            return self.plan.new_shapes[t.name]
        return tuple(self.pg.value(t.name).shape) if t.name in self.pg.nx else tuple(t.shape)

    def const(self, node: gs.Node, i: int, values: np.ndarray) -> None:
        self.counter += 1
        node.inputs[i] = gs.Constant(f"{node.name}_arg{i}_{self.counter}", np.asarray(values))


def _rw_target_shape(c: _Ctx, n: gs.Node) -> None:
    if n.outputs[0].name in c.plan.new_shapes:
        new = np.array(c.shape(n.outputs[0]), dtype=np.int64)
        old = const_input(n, 1)
        if n.op == "Reshape" and old is not None and old.shape == new.shape:
            # -1 (inferred) and 0 (copied) entries stand for sizes that may be symbolic (a
            # dynamic batch): keep them, they still compute the right size after pruning.
            keep = (old == -1) | ((old == 0) & (n.attrs.get("allowzero", 0) == 0))
            new[keep] = old[keep]
        c.const(n, 1, new)


def _rw_split(c: _Ctx, n: gs.Node) -> None:
    axis = c.pg.op(n.name).attrs["axis"]
    sizes = [int(c.shape(o)[axis]) for o in n.outputs]
    if len(n.inputs) > 1 and n.inputs[1].name:
        c.const(n, 1, np.array(sizes, dtype=np.int64))
    elif "split" in n.attrs:  # before opset 13 the sizes are an attribute
        n.attrs["split"] = sizes


def _rw_slice(c: _Ctx, n: gs.Node) -> None:
    a = c.pg.op(n.name).attrs
    if c.pg.op(n.name).kind != "slice" or a.get("step", 1) != 1:
        return
    k = c.plan.kept(n.inputs[0].name, a["axis"])
    if k is None:
        return
    start, end = int(np.searchsorted(k, a["start"])), int(np.searchsorted(k, a["end"]))
    r = len(c.shape(n.inputs[0]))
    c.const(n, 1, np.array([start], dtype=np.int64))
    c.const(n, 2, np.array([end], dtype=np.int64))
    c.const(n, 3, np.array([a["axis"]], dtype=np.int64)) if len(n.inputs) > 3 else n.inputs.append(
        gs.Constant(f"{n.name}_axes", np.array([a["axis"] % r], dtype=np.int64)))
    if len(n.inputs) > 4:
        c.const(n, 4, np.array([1], dtype=np.int64))


def _rw_groups(c: _Ctx, n: gs.Node) -> None:
    size = c.plan.op_size(n.name, "groups")
    if size is not None:
        key = "group" if n.op in ("Conv", "ConvTranspose") else "num_groups"
        n.attrs[key] = size


ARG_REWRITES: dict[str, Callable[[_Ctx, gs.Node], None]] = {
    "Reshape": _rw_target_shape, "Expand": _rw_target_shape, "Split": _rw_split,
    "Slice": _rw_slice, "Conv": _rw_groups, "ConvTranspose": _rw_groups,
    "GroupNormalization": _rw_groups,
}  # fmt: skip


def map_constants(graph: gs.Graph, pg: PruneGraph,
                  fn: Callable[[str, np.ndarray], np.ndarray | None]) -> None:  # fmt: skip
    """Replace each constant *use* whose IR value ``fn`` maps to a new array.

    A constant with a single use keeps its name; a shared one gets a fresh constant per changed
    use, so the other users keep the original.
    """
    uses = pg.source.const_uses
    counts: dict[str, int] = {}
    for n in graph.nodes:
        for t in n.inputs:
            counts[t.name] = counts.get(t.name, 0) + 1
    for n in graph.nodes:
        for i, t in enumerate(n.inputs):
            vid = uses.get((n.name, i))
            if vid is None:
                continue
            new = fn(vid, np.array(const_input(n, i)))
            if new is None:
                continue
            new = np.ascontiguousarray(new)
            if counts.get(t.name, 0) == 1 and isinstance(t, gs.Constant):
                t.values = new
            else:
                n.inputs[i] = gs.Constant(f"{t.name}.{n.name}.{i}", new)


def apply_plan_onnx(pg: PruneGraph, plan: RemovalPlan, verify: bool = True) -> onnx.ModelProto:
    """A new ONNX model computing ``pg``'s model with the plan's channels removed."""
    graph = pg.source.graph_copy()
    c = _Ctx(pg, plan)
    map_constants(graph, pg, lambda vid, arr: slice_array(arr, vid, plan)
                  if vid in plan.new_shapes else None)  # fmt: skip
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name in plan.new_shapes:
            t.shape = list(plan.new_shapes[name])
    for n in graph.nodes:
        rw = ARG_REWRITES.get(n.op)
        if rw is not None and n.name in pg.nx:
            rw(c, n)
    model = pg.source.export(graph)
    if pg.source.dynamic is not None:
        for key in pg.source.dynamic.replay:  # rebuilt from the original graph: never sliced
            vid = pg.source.const_uses.get(key)
            if vid is not None and vid in plan.new_shapes:
                raise VerificationError(
                    f"the plan slices constant {vid!r} of node {key[0]!r}, which follows the "
                    "model's symbolic dims and is rebuilt from the original graph at run time; "
                    "exclude the group through it, or fix its dims with dynamic_shapes.")
        model = pg.source.dynamic.restore(model)
    if verify:
        verify_onnx(pg, plan, model)
    return model


def verify_onnx(pg: PruneGraph, plan: RemovalPlan, model: onnx.ModelProto) -> None:
    """Checker + strict shape inference (every inferred static shape must equal the plan's), then
    the model is *run* in onnxruntime on the example (or synthesised) inputs at every size the
    source checks: shape inference does not check a Reshape against its input's size."""
    try:
        check_model(model)
        inferred = infer_shapes(model, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        raise VerificationError(f"the pruned ONNX model is invalid: {str(e)[:500]}") from e
    producer = {o: n.name for n in inferred.graph.node for o in n.output}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name not in pg.nx:
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        want = plan.new_shapes.get(vi.name, tuple(pg.value(vi.name).shape))
        if dims and len(dims) == len(want) and all(d in (0, w) for d, w in zip(dims, want)):
            continue  # 0: a symbolic (dynamic) dim, checked by running below
        if dims:
            raise VerificationError(
                f"ONNX node {producer.get(vi.name, '?')!r} produces {vi.name!r} with shape "
                f"{dims} after pruning; the plan expects {list(want)}."
            )
    for feeds in pg.source.check_feeds(pg):
        try:
            run_checked(model, feeds)
        except VerificationError:
            _check_source_runs(pg, feeds)
            raise


def _check_source_runs(pg: PruneGraph, feeds: dict[str, np.ndarray]) -> None:
    """After the written model failed: if the model as given fails too, say so (an exporter's
    invalid output is not a pruning error)."""
    why = _ort_failure(pg.source.original(), feeds)
    if why is not None:
        raise CaptureError(
            f"the input ONNX model itself fails in onnxruntime {why}; nothing was pruned. "
            "Re-export it (check an exporter's output in onnxruntime; for fp16, export in fp32 "
            "and convert the ONNX model)."
        )


def _ort_failure(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str | None:
    """Where and why ``model`` fails in onnxruntime on ``feeds``, or ``None`` when it runs."""
    from graphprune.frontends.onnx.session import run_onnx

    try:
        run_onnx(model, feeds, threads=1)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (Fail, InvalidArgument, ...)
        msg = str(e)
        m = re.search(r"(\w+) node\. Name:'([^']*)'", msg)
        t = re.search(r"Optype \((\w+)\).* in node \(([^)]*)\)", msg)
        where = (f"node {m.group(2)!r} ({m.group(1)})" if m else
                 f"node {t.group(2)!r} ({t.group(1)})" if t else "a node")  # fmt: skip
        shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
        return f"at {where} on inputs {shapes}: {msg[:400]}"
    return None


def run_checked(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Run ``model`` in onnxruntime; a failure is a :class:`VerificationError` naming the node."""
    why = _ort_failure(model, feeds)
    if why is not None:
        raise VerificationError(
            f"the pruned ONNX model fails in onnxruntime {why}. The plan is wrong for this node; "
            "report the model (and prune with the groups through it excluded meanwhile)."
        )
