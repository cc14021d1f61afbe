"""Static shapes for ONNX models as exporters write them: fold shape subgraphs, fix symbolic dims.

Runs at the start of ONNX capture. Exporters compute sizes in the graph (the legacy exporter's
``Shape → Gather → Div → Slice`` for ``chunk``, the ``Expand`` of a class token, ``Reshape``
targets concatenated from ``Shape`` pieces, ``Pad`` with computed pads), and a dynamic axis
(``dim_param``, e.g. ``"batch"``) leaves every size downstream of it unknown. The analysis needs
static sizes, so the model is analysed at fixed sizes of its symbolic dims and its shape-only
subgraphs are folded to constants by onnxslim (chosen over onnxsim, onnxruntime's symbolic
shape inference and onnx-graphsurgeon's ``fold_constants``: see ``pyproject.toml``).

Symbolic dims are kept in what is written back: the model is folded at the analysed sizes and at
other ones (:mod:`~graphprune.frontends.onnx.prepare`), and every constant that differs between
the folds is recorded as a function of the symbolic dims (an affine ``Reshape`` target of
``batch × windows``, a tiled block, a replayed subgraph). :class:`DynamicDims` holds those;
:meth:`DynamicDims.restore` rebuilds the constants of a written model from the inputs' runtime
shapes and puts the ``dim_param`` names back on its inputs and outputs (a dim that fell back to
static is written with its size).
"""

from __future__ import annotations

import contextlib
import gc
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.frontends.onnx.files import annotate_shapes
from graphprune.frontends.onnx.nodes import const_input
from graphprune.frontends.onnx.replay import Replay, splice
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


def fix_dims(model: onnx.ModelProto, sizes: dict[str, int], inplace: bool = False,
             uses: dict[str, list[tuple[str, int]]] | None = None) -> onnx.ModelProto:  # fmt: skip
    """``model`` (``inplace``) or a copy of it whose symbolic input dims (``uses``, default
    :func:`symbolic_dims`) are set to ``sizes``."""
    if inplace:
        fixed = model
    else:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
    where = {(i, a): d for d, at in (uses or symbolic_dims(model)).items() for i, a in at}
    for vi in fixed.graph.input:
        for a, d in enumerate(vi.type.tensor_type.shape.dim):
            if (vi.name, a) in where:
                d.Clear()
                d.dim_value = int(sizes[where[(vi.name, a)]])
    del fixed.graph.value_info[:]
    return fixed


@contextlib.contextmanager
def folding(model: onnx.ModelProto, owned: bool, uses: dict[str, list[tuple[str, int]]]):
    """``fold(sizes)``: the model folded at ``sizes`` of its symbolic dims. An ``owned`` model
    (capture loaded it from a file) has its dims set in place instead of copied, one copy of the
    weights less, and gets its symbolic dims back on exit."""
    dims = [(vi.type.tensor_type.shape.dim, a) for vi in model.graph.input
            for a in range(len(vi.type.tensor_type.shape.dim))]  # fmt: skip
    saved = [(dim, a, onnx.TensorShapeProto.Dimension()) for dim, a in dims]
    for dim, a, copy in saved:
        copy.CopyFrom(dim[a])
    try:
        yield lambda sizes: fold_shapes(fix_dims(model, sizes, inplace=owned, uses=uses))
    finally:
        if owned:
            for dim, a, copy in saved:
                dim[a].CopyFrom(copy)


def fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constant and shape-only subgraphs (onnxslim). Fusions that would leave the model's
    opset (``Gelu`` before opset 20) are skipped; Conv+BN folding is kept (as the legacy exporter
    already does).

    onnxslim's own shape inference copies the whole model several times over (onnxruntime's
    symbolic inference deep-copies it, onnx's serialises it), so it is turned off and the shapes
    are inferred here on the weightless :func:`~graphprune.frontends.onnx.files.skeleton`
    between rounds instead, until a round changes nothing (the same folded graphs on the zoo's
    exports, in a third to a half of the time). ``model`` gets its inferred ``value_info``
    (its outputs stay as declared).
    """
    import onnxslim

    given = model
    outputs = [onnx.ValueInfoProto() for _ in given.graph.output]
    for o, v in zip(outputs, given.graph.output):
        o.CopyFrom(v)
    try:
        for _ in range(10):
            annotate_shapes(model)
            with contextlib.redirect_stdout(io.StringIO()):
                out = onnxslim.slim(model, no_shape_infer=True,
                                    skip_fusion_patterns=["FusionGelu"])  # fmt: skip
            done = [(n.op_type, list(n.input)) for n in out.graph.node] == [
                (n.op_type, list(n.input)) for n in model.graph.node]
            model = out
            if done:
                break
        annotate_shapes(model)
        return model
    except Exception as e:  # noqa: BLE001 - onnxslim raises what its passes raise
        raise CaptureError(f"folding the model's shape computations failed: {e}") from e
    finally:
        del given.graph.output[:]  # as declared (annotating the input set its inferred shapes)
        given.graph.output.extend(outputs)
        gc.collect()  # onnxslim's graphs are cyclic: free their copies of the weights now


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
    #: (sizes, tensor name -> shape) of the model folded at other sizes of its dims, from which
    #: :mod:`~graphprune.frontends.onnx.symbols` fits each value's size expressions
    probes: list[tuple[dict[str, int], dict[str, tuple]]] = field(default_factory=list)
    #: (node name, input slot) -> the original subgraph that computes the constant at any size
    #: (a causal mask, a flattened-batch index: :mod:`~graphprune.frontends.onnx.replay`)
    replay: dict[tuple[str, int], Replay] = field(default_factory=dict)
    #: dim -> why it was fixed at its analysed size although its range allowed others
    static: dict[str, str] = field(default_factory=dict)

    def symbolic(self, d: str) -> bool:
        """Whether dim ``d`` stays symbolic (its range has more than one size)."""
        lo, hi = self.ranges[d]
        return lo < hi

    def rename(self, old: str, new: str) -> None:
        """Node ``old`` is called ``new`` in the captured graph."""
        for table in (self.affine, self.broadcast, self.replay):
            for key in [k for k in table if k[0] == old]:
                table[(new, key[1])] = table.pop(key)

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

    def _progression(self, graph: gs.Graph, name: str, slot: int, arr: np.ndarray,
                     per_dim: dict[str, tuple[int, int]], dim_value: Any) -> gs.Tensor:  # fmt: skip
        """A repeated block Tiled along each dim's axis (as many times as the runtime dims say),
        or ``first + range(length) · step`` along the one dynamic axis."""
        core, repeats = arr, True
        for axis, _ in per_dim.values():
            core, step = progression(core, axis)
            repeats = repeats and step is None
        p = f"{name}_gp_prog{slot}"
        if repeats:  # a block repeated along each axis: Tile it (length / period) times
            reps: gs.Tensor = gs.Constant(f"{p}_reps0", np.array(
                [n // k for n, k in zip(arr.shape, core.shape)], np.int64))  # fmt: skip
            for d, (axis, coef) in per_dim.items():
                k = np.array([coef // core.shape[axis] if i == axis else 0
                              for i in range(arr.ndim)], np.int64)  # fmt: skip
                term = graph.layer(op="Mul", inputs=[dim_value(d), gs.Constant(f"{p}_coef_{d}", k)],
                                   outputs=[f"{p}_dreps_{d}"])[0]  # fmt: skip
                reps = graph.layer(op="Add", inputs=[reps, term], outputs=[f"{p}_reps_{d}"])[0]
            return graph.layer(op="Tile", inputs=[gs.Constant(f"{p}_block", core), reps],
                               outputs=[f"{p}_value"])[0]  # fmt: skip
        (d, (axis, coef)), = per_dim.items()
        first, step = progression(arr, axis)
        length = graph.layer(op="Add", inputs=[
            gs.Constant(f"{p}_len0", np.array([arr.shape[axis]], dtype=np.int64)),
            graph.layer(op="Mul", inputs=[dim_value(d), gs.Constant(
                f"{p}_coef", np.array([coef], dtype=np.int64))], outputs=[f"{p}_dlen"])[0]],
            outputs=[f"{p}_len"])[0]  # fmt: skip
        scalar = graph.layer(op="Squeeze", inputs=[length, gs.Constant(
            f"{p}_ax0", np.array([0], dtype=np.int64))], outputs=[f"{p}_n"])[0]  # fmt: skip
        zero, one = (gs.Constant(f"{p}_{k}", np.array(v, dtype=np.int64))
                     for k, v in (("zero", 0), ("one", 1)))  # fmt: skip
        idx = graph.layer(op="Range", inputs=[zero, scalar, one], outputs=[f"{p}_range"])[0]
        shape = np.array([-1 if i == axis else 1 for i in range(arr.ndim)], dtype=np.int64)
        idx = graph.layer(op="Reshape", inputs=[idx, gs.Constant(f"{p}_shape", shape)],
                          outputs=[f"{p}_idx"])[0]  # fmt: skip
        to = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        idx = graph.layer(op="Cast", inputs=[idx], attrs={"to": to}, outputs=[f"{p}_cast"])[0]
        scaled = graph.layer(op="Mul", inputs=[idx, gs.Constant(f"{p}_step", step)],
                             outputs=[f"{p}_scaled"])[0]  # fmt: skip
        return graph.layer(op="Add", inputs=[scaled, gs.Constant(f"{p}_first", first)],
                           outputs=[f"{p}_value"])[0]  # fmt: skip

    def restore(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (written at the analysed sizes) with its symbolic dims back: affine
        constants computed from the inputs' runtime shapes, ``dim_param`` names on inputs and
        outputs, no stale intermediate shapes."""
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        dims: dict[str, gs.Variable] = {}
        deltas: dict[str, gs.Variable] = {}

        def dim_size(d: str) -> gs.Variable:
            if d not in dims:
                name, axis = self.uses[d][0]
                shape = graph.layer(op="Shape", inputs=[tensors[name]],
                                    outputs=[f"gp_dim_{d}_shape"])[0]  # fmt: skip
                idx = gs.Constant(f"gp_dim_{d}_axis", np.array([axis], dtype=np.int64))
                dims[d] = graph.layer(op="Gather", inputs=[shape, idx], outputs=[f"gp_dim_{d}"])[0]
            return dims[d]

        def dim_value(d: str) -> gs.Variable:
            if d not in deltas:
                off = gs.Constant(f"gp_dim_{d}_at", np.array([self.sizes[d]], dtype=np.int64))
                deltas[d] = graph.layer(op="Sub", inputs=[dim_size(d), off],
                                        outputs=[f"gp_dim_{d}_delta"])[0]  # fmt: skip
            return deltas[d]

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
            if arr is not None:
                node.inputs[slot] = self._progression(graph, node_name, slot, arr, per_dim,
                                                      dim_value)  # fmt: skip
        for k, ((node_name, slot), rep) in enumerate(sorted(self.replay.items())):
            node = by_name.get(node_name)
            if node is not None:
                node.inputs[slot] = splice(graph, rep, f"gp_replay{k}", dim_size)
        for d, uses in self.uses.items():
            for name, axis in uses:
                shape = list(tensors[name].shape)
                shape[axis] = d if self.symbolic(d) else self.sizes[d]
                tensors[name].shape = shape
        fixed = {d for d in self.uses if not self.symbolic(d)}
        for t in graph.outputs:
            if t.name in self.outputs:
                t.shape = [s if not p or p in fixed else p
                           for p, s in zip(self.outputs[t.name], t.shape)]  # fmt: skip
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
                t.shape = None
        graph.cleanup().toposort()
        out = gs.export_onnx(graph)
        out.ir_version = model.ir_version
        out.ClearField("opset_import")
        out.opset_import.extend(model.opset_import)
        return out


def progression(arr: np.ndarray, ax: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(block, step)``: ``arr`` along ``ax`` is its leading ``block`` repeated (``step`` None:
    a Tile of a class token, of a window mask over the batch) or, for a one-slice block,
    ``block + i · step`` (an index into a flattened batch); ``None``s when it is neither."""
    n = arr.shape[ax]
    for period in (p for p in range(1, n) if n % p == 0):
        block = np.take(arr, np.arange(period), axis=ax)
        reps = [n // period if i == ax else 1 for i in range(arr.ndim)]
        if np.array_equal(np.tile(block, reps), arr):
            return block, None
    first = np.take(arr, [0], axis=ax)
    if n < 2:
        return first, None
    delta = np.take(arr, [1], axis=ax) - first
    steps = np.arange(n).reshape([-1 if i == ax else 1 for i in range(arr.ndim)])
    ok = np.array_equal(first + steps * delta, arr)
    return (first, delta) if ok else (None, None)


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
