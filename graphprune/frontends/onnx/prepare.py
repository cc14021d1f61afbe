"""Fold a model at its analysed sizes and at probes, and record how its constants follow the dims.

The second half of :mod:`~graphprune.frontends.onnx.shapes`: :func:`prepare` folds the model at
the sizes it is analysed at, then once more per symbolic dim one step away (and per pair of dims),
and compares the folds constant by constant. A constant that changes is recorded in
:class:`~graphprune.frontends.onnx.shapes.DynamicDims` as an affine argument, a block tiled over
the dims, a prefix of a table (a position-embedding slice) or, where none of those fits, a replay
of the exporter's own subgraph (:mod:`~graphprune.frontends.onnx.replay`). A dim for which none of
that works falls back to static at its example size, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.frontends.onnx.files import skeleton
from graphprune.frontends.onnx.nodes import const_input, same_bytes
from graphprune.frontends.onnx.replay import ReplayIndex, find_replay
from graphprune.frontends.onnx.shapes import (
    DEFAULT_RANGE,
    DynamicDims,
    fix_dims,
    folding,
    progression,
    symbolic_dims,
)
from graphprune.frontends.onnx.symbols import probe_shapes, probe_sizes
from graphprune.ir.errors import CaptureError


def _sizes_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None,
               ranges: dict[str, tuple[int, int]]) -> dict[str, int]:  # fmt: skip
    sizes = {}
    for d, uses in symbolic_dims(model).items():
        lo, hi = ranges[d]
        for name, axis in uses:
            if feeds and name in feeds:
                sizes[d] = int(np.shape(feeds[name])[axis])
                break
        else:
            sizes[d] = min(max(lo, 2), hi)
        if not lo <= sizes[d] <= hi:
            raise CaptureError(f"input dim {d!r} is {sizes[d]}, outside its range {(lo, hi)}")
    return sizes


class _Static(Exception):
    """Dim ``dim`` cannot stay symbolic, for ``reason``: analyse it at its example size."""

    def __init__(self, dim: str, reason: str):
        super().__init__(reason)
        self.dim, self.reason = dim, reason


def prepare(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
            dynamic_shapes: dict[str, tuple[int, int]] | None = None, owned: bool = False,
            ) -> tuple[onnx.ModelProto, DynamicDims | None]:  # fmt: skip
    """The model to analyse (static, folded) and, if it has symbolic dims, their record.

    A dim that cannot stay symbolic (the model folds to different graphs at two of its sizes, a
    constant follows it in a way nothing here rebuilds, the model fails at another size) is
    fixed at its example size instead, and ``DynamicDims.static`` says why. ``owned``: the model
    is capture's own (loaded from a file), folded without copying it (:func:`folding`)."""
    uses = symbolic_dims(model)
    unknown = set(dynamic_shapes or {}) - set(uses)
    if unknown:
        raise CaptureError(f"dynamic_shapes names {sorted(unknown)}, which are not symbolic dims "
                           f"of the model's inputs (those are {sorted(uses)})")  # fmt: skip
    ranges = {d: tuple((dynamic_shapes or {}).get(d, DEFAULT_RANGE)) for d in uses}
    sizes = _sizes_for(model, feeds, ranges)
    with folding(model, owned, uses) as fold:
        folded = fold(sizes)
        if not uses:
            return folded, None
        static: dict[str, str] = {}
        while True:
            try:
                out, dyn = _prepare_dynamic(model, fold, folded, sizes, ranges, uses)
            except _Static as e:
                static[e.dim] = e.reason
                ranges[e.dim] = (sizes[e.dim], sizes[e.dim])
                continue
            dyn.static = static
            return out, dyn


def _prepare_dynamic(model: onnx.ModelProto, fold, folded: onnx.ModelProto, sizes: dict[str, int],
                     ranges: dict[str, tuple[int, int]], uses: dict[str, list[tuple[str, int]]],
                     ) -> tuple[onnx.ModelProto, DynamicDims]:  # fmt: skip
    outputs = {o.name: [d.dim_param for d in o.type.tensor_type.shape.dim]
               for o in model.graph.output}  # fmt: skip
    dyn = DynamicDims(sizes, dict(ranges), uses, outputs=outputs)
    base = gs.import_onnx(folded)
    shell = skeleton(model)  # the graph without its weights, for shape inference
    index = ReplayIndex(model, lambda at: _original_shapes(shell, at, uses), sizes,
                        probe_sizes(sizes, ranges))  # fmt: skip
    sliced = False
    for d in uses:
        lo, hi = ranges[d]
        other = sizes[d] + 1 if sizes[d] + 1 <= hi else sizes[d] - 1
        if other < lo or other == sizes[d]:
            continue  # a fixed-size "range": nothing varies
        try:
            varied_model = fold({**sizes, d: other})
            dyn.probes.append(({**sizes, d: other}, probe_shapes(varied_model)))
        except Exception as e:  # noqa: BLE001 - the model does not fold or infer at that size
            raise _Static(d, f"the model does not fold at {d}={other}: {str(e)[:200]}") from e
        varied = gs.import_onnx(varied_model)
        prefixes = _prefix_constants(base, varied)
        if prefixes:  # each a Slice of the constant at the range's largest size
            full = gs.import_onnx(fold({**sizes, d: hi}))
            for k, i, ax in sorted(prefixes, reverse=True):
                table = const_input(full.nodes[k], i)
                if table is None or table.ndim <= ax:
                    raise _Static(d, f"node {base.nodes[k].name!r} ({base.nodes[k].op}) reads a "
                                     f"prefix of a constant that does not fold at {d}={hi}")
                for g in (base, varied):
                    _slice_prefix(g, k, i, table, ax)
            sliced = True
        _record_affine(dyn, d, base, varied, other - sizes[d], index)
        del varied, varied_model  # one folded copy at a time besides the base
    for at in probe_sizes(sizes, ranges):  # pairs of dims stepped together (a batch*seq axis)
        if sum(at[k] != sizes[k] for k in at) == 2:
            dyn.probes.append((at, probe_shapes(fold(at))))
    for key in dyn.replay:  # the replay computes the whole constant, every dim's part of it
        dyn.affine.pop(key, None)
        dyn.broadcast.pop(key, None)
    if sliced:
        out = gs.export_onnx(base)
        out.ir_version = folded.ir_version
        out.ClearField("opset_import")
        out.opset_import.extend(folded.opset_import)
        folded = out
    return folded, dyn


def _original_shapes(model: onnx.ModelProto, at: dict[str, int],
                     uses: dict[str, list[tuple[str, int]]]) -> dict[str, tuple]:  # fmt: skip
    """Every tensor's inferred shape in the original ``model`` with its dims fixed to ``at``."""
    try:
        return probe_shapes(fix_dims(model, at, uses=uses))
    except Exception:  # noqa: BLE001 - shape inference failing leaves every size unknown
        return {}


def _prefix_constants(base: gs.Graph, varied: gs.Graph) -> list[tuple[int, int, int]]:
    """``(node index, input slot, axis)`` of each constant that grows with the dim along one axis
    and keeps its values (a position-embedding table sliced to the sequence length, folded)."""
    found = []
    if [n.op for n in base.nodes] != [n.op for n in varied.nodes]:
        return found  # _record_affine says why
    for k, (nb, nv) in enumerate(zip(base.nodes, varied.nodes)):
        for i in range(len(nb.inputs)):
            if same_bytes(nb.inputs[i], nv.inputs[i]):
                continue
            a, b = const_input(nb, i), const_input(nv, i)
            if a is None or b is None or a.ndim != b.ndim or a.ndim == 0 or a.dtype.kind != "f":
                continue
            if _broadcast_axis(a, b) is not None:
                continue  # a repeated block or a progression: rebuilt for any size instead
            axes = [j for j in range(a.ndim) if a.shape[j] != b.shape[j]]
            if (len(axes) == 1 and a.shape[axes[0]] < b.shape[axes[0]]
                    and np.array_equal(np.take(b, np.arange(a.shape[axes[0]]), axis=axes[0]),
                                       a)):  # fmt: skip
                found.append((k, i, axes[0]))
    return found


def _slice_prefix(graph: gs.Graph, k: int, i: int, table: np.ndarray, ax: int) -> None:
    """Input ``i`` of node ``k`` becomes ``Slice(table, 0, n, axis)``, ``n`` its current length:
    the end is then an affine argument (``n`` grows with the dim) that the written model
    computes from the runtime shape, and the table is a parameter pruned like the constant."""
    node = graph.nodes[k]
    n = const_input(node, i).shape[ax]
    p = f"{node.name}_gp_prefix{i}"
    out = gs.Variable(f"{p}_out", dtype=table.dtype)
    args = [gs.Constant(f"{p}_{key}", np.array([v], dtype=np.int64))
            for key, v in (("start", 0), ("end", n), ("axis", ax))]  # fmt: skip
    graph.nodes.insert(k, gs.Node("Slice", f"{p}_slice", inputs=[
        gs.Constant(f"{p}_table", np.ascontiguousarray(table)), *args], outputs=[out]))
    node.inputs[i] = out


def _record_affine(dyn: DynamicDims, d: str, base: gs.Graph, varied: gs.Graph, step: int,
                   index: ReplayIndex) -> None:  # fmt: skip
    if [n.op for n in base.nodes] != [n.op for n in varied.nodes]:
        at = next((f"node {a.name!r} ({a.op}) vs {b.name!r} ({b.op})" for a, b in
                   zip(base.nodes, varied.nodes) if a.op != b.op), "a different node count")
        raise _Static(d, f"the model folds to different graphs at two sizes of {d!r} ({at})")
    for nb, nv in zip(base.nodes, varied.nodes):
        for i in range(len(nb.inputs)):
            if same_bytes(nb.inputs[i], nv.inputs[i]):
                continue
            a, b = const_input(nb, i), const_input(nv, i)
            if a is None or b is None or (a.shape == b.shape and np.array_equal(a, b)):
                continue
            axis = _broadcast_axis(a, b)
            coef = (b.shape[axis] - a.shape[axis]) // step if axis is not None else 0
            block, delta = progression(a, axis) if axis is not None else (None, None)
            if (axis is not None and (b.shape[axis] - a.shape[axis]) % step == 0
                    and (delta is not None or coef % block.shape[axis] == 0)
                    and _joins(dyn.broadcast.get((nb.name, i), {}), a, axis, delta)):  # fmt: skip
                dyn.broadcast.setdefault((nb.name, i), {})[d] = (axis, coef)
                continue
            diff = (b.astype(np.int64) - a.astype(np.int64)) if a.shape == b.shape else None
            if (diff is not None and a.ndim == 1 and a.dtype.kind in "iu"
                    and not np.any(diff % step)):  # fmt: skip
                dyn.affine.setdefault((nb.name, i), {})[d] = diff // step
                continue
            if (nb.name, i) in dyn.replay:
                continue
            rep = find_replay(index, nb.inputs[i].name, a.dtype)
            if isinstance(rep, str):
                raise _Static(d, f"node {nb.name!r} ({nb.op}) reads a constant of shape "
                                 f"{a.shape} that follows {d!r}; {rep}")  # fmt: skip
            dyn.replay[(nb.name, i)] = rep


def _joins(others: dict[str, tuple[int, int]], a: np.ndarray, axis: int, delta) -> bool:
    """Whether a broadcast along ``axis`` can join those of ``others`` dims: none yet, or all of
    them (this one too) a block repeated along its own axis (a mask tiled over batch and seq)."""
    if not others:
        return True
    axes = [ax for ax, _ in others.values()]
    return (delta is None and axis not in axes
            and all(progression(a, ax)[1] is None for ax in axes))  # fmt: skip


def _broadcast_axis(a: np.ndarray, b: np.ndarray) -> int | None:
    """The one axis along which ``a`` and ``b`` differ in size, if along it both are the same
    arithmetic progression of one slice (an ``Expand`` of a class token over the batch, or the
    ``batch × seq + position`` index into a flattened batch, folded into a constant)."""
    if a.ndim != b.ndim:
        return None
    axes = [i for i in range(a.ndim) if a.shape[i] != b.shape[i]]
    if len(axes) != 1:
        return None
    ax = axes[0]
    first, delta = progression(a, ax)
    if first is None:
        return None
    first_b, delta_b = progression(b, ax)
    if first_b is None or not np.array_equal(first, first_b):
        return None
    return ax if delta is None or delta_b is None or np.array_equal(delta, delta_b) else None


__all__ = ["prepare"]
