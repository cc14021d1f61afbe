"""Size-dependent constants rebuilt by replaying the exporter's own subgraph.

Capture folds a model's shape subgraphs at fixed sizes of its symbolic dims
(:mod:`~graphprune.frontends.onnx.shapes`). Most folded constants that change with a dim are
``Reshape`` targets (affine in the dims) or repeated blocks, which ``DynamicDims`` rebuilds from a
formula. Decoders also fold constants that no such formula covers: the causal mask
(``seq × seq``, lower-triangular) and the index into a flattened ``batch × seq`` mask
(``b·seq + j``) that optimum's and the legacy exporter's GPT-2 and LLaMA graphs compute. Those are
rebuilt here by *replaying* the nodes that computed them in the original model: the walk back from
the folded tensor's name collects every producer down to ``Shape`` nodes and small constants. A
``Shape`` leaf becomes, per axis, a polynomial in the input dims fitted from the probed sizes
(:func:`~graphprune.frontends.onnx.symbols.fit_terms`), so the replay never reads a tensor of the
pruned model (whose channel axes are smaller) and its result is the original model's at any size.

A subgraph that reads an input's *values*, a large weight, or a size that fits no polynomial
cannot be replayed: :func:`find_replay` returns why, and the dim falls back to static.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from graphprune.frontends.onnx.symbols import Terms, fit_terms

#: a replayed subgraph may copy constants up to this many bytes (a baked causal-mask buffer of a
#: few thousand positions; weights are never read by shape subgraphs)
MAX_CONSTANT_BYTES = 64 << 20

#: ops whose output is never a function of their inputs' shapes alone
_NO_REPLAY = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike", "Multinomial", "Bernoulli"}  # fmt: skip


@dataclass
class Replay:
    """The original nodes computing one folded constant, with its ``Shape`` leaves as inputs."""

    #: ``nodes``' graph: inputs are the Shape leaves (int64 vectors), output the constant
    model: onnx.ModelProto
    #: Shape leaf name -> per output element, its size as polynomial terms of the dims
    leaves: dict[str, list[Terms]] = field(default_factory=dict)


class _Refused(Exception):
    pass


class ReplayIndex:
    """The original model's producers and constants by tensor name, and a way to size tensors at
    the probed dims (``shapes_at``: sizes -> {tensor name: shape}, evaluated lazily)."""

    def __init__(self, model: onnx.ModelProto, shapes_at, sizes: dict[str, int],
                 probe_sizes: list[dict[str, int]]):  # fmt: skip
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.inputs = {i.name for i in model.graph.input} - set(self.inits)
        self.sizes, self.probe_sizes, self.shapes_at = sizes, probe_sizes, shapes_at
        self._shapes: dict[tuple, dict] = {}

    def shapes(self, at: dict[str, int]) -> dict[str, tuple]:
        key = tuple(sorted(at.items()))
        if key not in self._shapes:
            self._shapes[key] = self.shapes_at(at)
        return self._shapes[key]

    def size_terms(self, name: str) -> list[Terms]:
        """Per axis of tensor ``name`` of the original model, its size as polynomial terms."""
        base = self.shapes(self.sizes).get(name)
        if base is None or any(not isinstance(s, int) or s <= 0 for s in base):
            raise _Refused(f"the shape of {name!r} is not known at the analysed sizes")
        out = []
        for axis, b in enumerate(base):
            seen = []
            for p in self.probe_sizes:
                s = self.shapes(p).get(name)
                seen.append((p, s[axis] if s is not None and len(s) == len(base) else None))
            terms = fit_terms(b, self.sizes, seen) if seen else (b, {}, {})
            if terms is None:
                raise _Refused(f"axis {axis} of {name!r} follows the dims in a way no polynomial "
                               "of degree one per dim fits")  # fmt: skip
            out.append(terms)
        return out


def find_replay(index: ReplayIndex, name: str, dtype: np.dtype) -> Replay | str:
    """The replay of original tensor ``name`` (of ``dtype``), or why it cannot be replayed."""
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    leaves: dict[str, list[Terms]] = {}
    done: set[str] = set()

    def visit(t: str) -> None:
        if not t or t in done:
            return
        done.add(t)
        if t in index.inits:
            init = index.inits[t]
            if int(np.prod(init.dims)) * 8 > MAX_CONSTANT_BYTES:
                raise _Refused(f"it reads the values of the large constant {t!r}")
            inits[t] = init
            return
        if t in index.inputs:
            raise _Refused(f"it reads the values of input {t!r}")
        node = index.producer.get(t)
        if node is None:
            raise _Refused(f"tensor {t!r} has no producer in the original model")
        if node.op_type in _NO_REPLAY or node.domain not in ("", "ai.onnx"):
            raise _Refused(f"it goes through {node.op_type} node {node.name!r}")
        if node.op_type == "Shape":
            terms = index.size_terms(node.input[0])
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            r = len(terms)
            start, end = attrs.get("start", 0), attrs.get("end", r)
            leaves[t] = terms[slice(*slice(start, end).indices(r)[:2])]
            return
        if node.op_type == "Size":
            raise _Refused(f"it reads the Size of {node.input[0]!r}")
        for i in node.input:
            visit(i)
        nodes.append(node)

    try:
        visit(name)
    except _Refused as e:
        return f"the constant {name!r} cannot be rebuilt from the original graph: {e}"
    if not nodes:
        return f"the constant {name!r} is not computed by the original graph"
    graph = helper.make_graph(
        nodes, "replay",
        [helper.make_tensor_value_info(k, TensorProto.INT64, [len(v)]) for k, v in leaves.items()],
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)],
        initializer=list(inits.values()))  # fmt: skip
    model = helper.make_model(graph, opset_imports=list(index.model.opset_import))
    model.ir_version = index.model.ir_version
    return Replay(model, leaves)


def splice(graph: gs.Graph, replay: Replay, prefix: str, dim_value) -> gs.Tensor:
    """Add ``replay``'s nodes to ``graph`` (names prefixed) with its Shape leaves computed from the
    runtime input dims (``dim_value(d)``: a one-element int64 tensor); returns its output."""
    sub = gs.import_onnx(replay.model)
    for t in sub.tensors().values():
        t.name = f"{prefix}/{t.name}"
    for n in sub.nodes:
        n.name = f"{prefix}/{n.name or n.op}"
    for leaf in sub.inputs:
        key = leaf.name[len(prefix) + 1:]
        parts = [_poly(graph, f"{leaf.name}_{a}", terms, dim_value)
                 for a, terms in enumerate(replay.leaves[key])]  # fmt: skip
        graph.nodes.append(gs.Node("Concat", f"{leaf.name}_concat", attrs={"axis": 0},
                                   inputs=parts, outputs=[leaf]))  # fmt: skip
        leaf.dtype, leaf.shape = np.int64, [len(parts)]
    graph.nodes.extend(sub.nodes)
    return sub.outputs[0]


def _poly(graph: gs.Graph, p: str, terms: Terms, dim_value) -> gs.Tensor:
    const, coef, cross = terms
    acc: gs.Tensor = gs.Constant(f"{p}_c", np.array([const], dtype=np.int64))
    products = [((d,), a) for d, a in coef.items()] + [((d, e), a) for (d, e), a in cross.items()]
    for k, (dims, a) in enumerate(products):
        term: gs.Tensor = gs.Constant(f"{p}_a{k}", np.array([a], dtype=np.int64))
        for j, d in enumerate(dims):
            term = graph.layer(op="Mul", inputs=[term, dim_value(d)],
                               outputs=[f"{p}_t{k}_{j}"])[0]  # fmt: skip
        acc = graph.layer(op="Add", inputs=[acc, term], outputs=[f"{p}_s{k}"])[0]
    return acc


__all__ = ["Replay", "ReplayIndex", "find_replay", "splice"]
