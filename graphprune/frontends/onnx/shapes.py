"""Static shapes for ONNX models as exporters write them: fold shape subgraphs, fix symbolic dims.

Runs at the start of ONNX capture. Exporters compute sizes in the graph (the legacy exporter's
``Shape → Gather → Div → Slice`` for ``chunk``, the ``Expand`` of a class token, ``Reshape``
targets concatenated from ``Shape`` pieces, ``Pad`` with computed pads), and a dynamic axis
(``dim_param``, e.g. ``"batch"``) leaves every size downstream of it unknown. The analysis needs
static sizes, so the model is analysed at fixed sizes of its symbolic dims and its shape-only
subgraphs are folded to constants by onnxslim (chosen over onnxsim, onnxruntime's symbolic
shape inference and onnx-graphsurgeon's ``fold_constants``: see ``pyproject.toml``).

Symbolic dims are kept in what is written back: the model is folded twice, at the analysed
sizes and at other ones, and every constant that differs between the two folds is an affine
function of the symbolic dims (a ``Reshape`` target of ``batch × windows``). :class:`DynamicDims`
records those functions; :meth:`DynamicDims.restore` rebuilds the constants of a written model
from the inputs' runtime shapes and puts the ``dim_param`` names back on its inputs and outputs.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.frontends.onnx.nodes import const_input
from graphprune.ir.errors import CaptureError

#: the range of a symbolic dim when ``dynamic_shapes`` does not give one
DEFAULT_RANGE = (1, 64)


def symbolic_dims(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    """``{dim_param: [(input name, axis), ...]}`` of the model's graph inputs."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[tuple[str, int]]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for a, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                out.setdefault(d.dim_param or f"{vi.name}:{a}", []).append((vi.name, a))
    return out


def fix_dims(model: onnx.ModelProto, sizes: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose symbolic input dims are set to ``sizes``."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    where = {(i, a): d for d, uses in symbolic_dims(model).items() for i, a in uses}
    for vi in fixed.graph.input:
        for a, d in enumerate(vi.type.tensor_type.shape.dim):
            if (vi.name, a) in where:
                d.Clear()
                d.dim_value = int(sizes[where[(vi.name, a)]])
    del fixed.graph.value_info[:]
    return fixed


def fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constant and shape-only subgraphs (onnxslim). Fusions that would leave the model's
    opset (``Gelu`` before opset 20) are skipped; Conv+BN folding is kept (as the legacy exporter
    already does)."""
    import onnxslim

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return onnxslim.slim(model, skip_fusion_patterns=["FusionGelu"])
    except Exception as e:  # noqa: BLE001 - onnxslim raises what its passes raise
        raise CaptureError(f"folding the model's shape computations failed: {e}") from e


@dataclass
class DynamicDims:
    """How a model's symbolic dims were fixed for analysis, and how to put them back."""

    sizes: dict[str, int]
    ranges: dict[str, tuple[int, int]]
    uses: dict[str, list[tuple[str, int]]]
    #: (node name, input slot) -> {dim: per-element coefficient of (dim - analysed size)}
    affine: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    #: (node name, input slot) -> {dim: (axis, coefficient)}: a constant that repeats one slice
    #: along ``axis``, ``coefficient × dim`` times (rebuilt as an ``Expand``)
    broadcast: dict[tuple[str, int], dict[str, tuple[int, int]]] = field(default_factory=dict)

    def input_shape(self, name: str, shape: tuple[int, ...], sizes: dict[str, int] | None):
        shape = list(shape)
        for d, uses in self.uses.items():
            for i, a in uses:
                if i == name and sizes and d in sizes:
                    shape[a] = sizes[d]
        return tuple(shape)

    def other_sizes(self) -> list[dict[str, int]]:
        """One more size per symbolic dim for verification: the other end of its range."""
        out = []
        for d, s in self.sizes.items():
            lo, hi = self.ranges[d]
            other = lo if lo != s else min(hi, s + 1)
            if other != s:
                out.append({d: other})
        return out

    def restore(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (written at the analysed sizes) with its symbolic dims back: affine
        constants computed from the inputs' runtime shapes, ``dim_param`` names on inputs and
        outputs, no stale intermediate shapes."""
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        dims: dict[str, gs.Variable] = {}

        def dim_value(d: str) -> gs.Variable:
            if d not in dims:
                name, axis = self.uses[d][0]
                shape = graph.layer(op="Shape", inputs=[tensors[name]],
                                    outputs=[f"gp_dim_{d}_shape"])[0]  # fmt: skip
                idx = gs.Constant(f"gp_dim_{d}_axis", np.array([axis], dtype=np.int64))
                v = graph.layer(op="Gather", inputs=[shape, idx], outputs=[f"gp_dim_{d}"])[0]
                off = gs.Constant(f"gp_dim_{d}_at", np.array([self.sizes[d]], dtype=np.int64))
                dims[d] = graph.layer(op="Sub", inputs=[v, off], outputs=[f"gp_dim_{d}_delta"])[0]
            return dims[d]

        by_name = {n.name: n for n in graph.nodes}
        for (node_name, slot), coeffs in self.affine.items():
            node = by_name.get(node_name)
            base = const_input(node, slot) if node is not None else None
            if base is None:
                continue
            acc: gs.Tensor = gs.Constant(f"{node_name}_gp_base{slot}", base.astype(np.int64))
            for d, coef in coeffs.items():
                k = gs.Constant(f"{node_name}_gp_coef{slot}_{d}", coef.astype(np.int64))
                term = graph.layer(op="Mul", inputs=[dim_value(d), k],
                                   outputs=[f"{node_name}_gp_term{slot}_{d}"])[0]  # fmt: skip
                acc = graph.layer(op="Add", inputs=[acc, term],
                                  outputs=[f"{node_name}_gp_arg{slot}_{d}"])[0]  # fmt: skip
            if base.dtype != np.int64:
                acc = graph.layer(op="Cast", inputs=[acc], attrs={"to": onnx.TensorProto.INT32},
                                  outputs=[f"{node_name}_gp_cast{slot}"])[0]  # fmt: skip
            node.inputs[slot] = acc
        for (node_name, slot), per_dim in self.broadcast.items():
            node = by_name.get(node_name)
            arr = const_input(node, slot) if node is not None else None
            if arr is None:
                continue
            (d, (axis, coef)), = per_dim.items()
            one = gs.Constant(f"{node_name}_gp_slice{slot}", np.take(arr, [0], axis=axis))
            size = np.zeros(arr.ndim, dtype=np.int64)
            size[axis] = coef
            base = np.array(arr.shape, dtype=np.int64)
            k = gs.Constant(f"{node_name}_gp_bcoef{slot}", size)
            term = graph.layer(op="Mul", inputs=[dim_value(d), k],
                               outputs=[f"{node_name}_gp_bterm{slot}"])[0]  # fmt: skip
            shape = graph.layer(op="Add", inputs=[gs.Constant(f"{node_name}_gp_bbase{slot}", base),
                                                  term],
                                outputs=[f"{node_name}_gp_bshape{slot}"])[0]  # fmt: skip
            node.inputs[slot] = graph.layer(op="Expand", inputs=[one, shape],
                                            outputs=[f"{node_name}_gp_bexp{slot}"])[0]  # fmt: skip
        for d, uses in self.uses.items():
            for name, axis in uses:
                shape = list(tensors[name].shape)
                shape[axis] = d
                tensors[name].shape = shape
        for t in graph.outputs:
            if t.name in self.outputs:
                t.shape = [p or s for p, s in zip(self.outputs[t.name], t.shape)]
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
                t.shape = None
        graph.cleanup().toposort()
        out = gs.export_onnx(graph)
        out.ir_version = model.ir_version
        out.ClearField("opset_import")
        out.opset_import.extend(model.opset_import)
        return out


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


def prepare(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
            dynamic_shapes: dict[str, tuple[int, int]] | None = None,
            ) -> tuple[onnx.ModelProto, DynamicDims | None]:  # fmt: skip
    """The model to analyse (static, folded) and, if it has symbolic dims, their record."""
    uses = symbolic_dims(model)
    unknown = set(dynamic_shapes or {}) - set(uses)
    if unknown:
        raise CaptureError(f"dynamic_shapes names {sorted(unknown)}, which are not symbolic dims "
                           f"of the model's inputs (those are {sorted(uses)})")  # fmt: skip
    ranges = {d: tuple((dynamic_shapes or {}).get(d, DEFAULT_RANGE)) for d in uses}
    sizes = _sizes_for(model, feeds, ranges)
    folded = fold_shapes(fix_dims(model, sizes))
    if not uses:
        return folded, None
    outputs = {o.name: [d.dim_param for d in o.type.tensor_type.shape.dim]
               for o in model.graph.output}  # fmt: skip
    dyn = DynamicDims(sizes, ranges, uses, outputs=outputs)
    base = gs.import_onnx(folded)
    for d in uses:
        lo, hi = ranges[d]
        other = sizes[d] + 1 if sizes[d] + 1 <= hi else sizes[d] - 1
        if other < lo or other == sizes[d]:
            continue  # a fixed-size "range": nothing varies
        varied = gs.import_onnx(fold_shapes(fix_dims(model, {**sizes, d: other})))
        _record_affine(dyn, d, base, varied, other - sizes[d])
    return folded, dyn


def _record_affine(dyn: DynamicDims, d: str, base: gs.Graph, varied: gs.Graph, step: int) -> None:
    if [n.op for n in base.nodes] != [n.op for n in varied.nodes]:
        raise CaptureError(
            f"the model folds to different graphs at two sizes of its dim {d!r}: it cannot be "
            "pruned with that dim kept symbolic; export it with a static size instead.")
    for nb, nv in zip(base.nodes, varied.nodes):
        for i in range(len(nb.inputs)):
            a, b = const_input(nb, i), const_input(nv, i)
            if a is None or b is None or (a.shape == b.shape and np.array_equal(a, b)):
                continue
            axis = _broadcast_axis(a, b)
            if axis is not None and (b.shape[axis] - a.shape[axis]) % step == 0:
                coef = (b.shape[axis] - a.shape[axis]) // step
                dyn.broadcast.setdefault((nb.name, i), {})[d] = (axis, coef)
                continue
            diff = (b.astype(np.int64) - a.astype(np.int64)) if a.shape == b.shape else None
            if (diff is None or a.ndim != 1 or a.dtype.kind not in "iu"
                    or np.any(diff % step)):  # fmt: skip
                raise CaptureError(
                    f"node {nb.name!r} ({nb.op}) reads a constant whose contents depend on the "
                    f"symbolic dim {d!r} in a way that cannot be rebuilt (shape {a.shape}); "
                    "export the model with a static size for it to prune.")
            dyn.affine.setdefault((nb.name, i), {})[d] = diff // step


def _broadcast_axis(a: np.ndarray, b: np.ndarray) -> int | None:
    """The one axis along which ``a`` and ``b`` differ in size, if both repeat one slice along
    it (an ``Expand`` of a class token over the batch, folded into a constant)."""
    if a.ndim != b.ndim:
        return None
    axes = [i for i in range(a.ndim) if a.shape[i] != b.shape[i]]
    if len(axes) != 1:
        return None
    ax = axes[0]
    first = np.take(a, [0], axis=ax)
    same = all(np.array_equal(np.broadcast_to(first, x.shape), x) for x in (a, b))
    return ax if same and np.array_equal(first, np.take(b, [0], axis=ax)) else None


def example_feeds(model: onnx.ModelProto, inputs: Any) -> dict[str, np.ndarray] | None:
    """``inputs`` (a mapping by name, a sequence by position, tensors or arrays) as feeds."""
    if inputs is None:
        return None
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if hasattr(inputs, "items"):
        pairs = list(inputs.items())
    else:
        seq = inputs if isinstance(inputs, (list, tuple)) else (inputs,)
        pairs = list(zip(names, seq))
    out = {}
    for k, v in pairs:
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[k] = v
    return out
