"""The graph IR every graphprune pass reads: :class:`PruneGraph`.

A ``PruneGraph`` wraps one ``networkx.MultiDiGraph`` that is bipartite, like onnx-graphsurgeon's:
*op* nodes and *value* nodes (activations, parameters, constants). A value→op edge carries the
argument ``slot`` the op reads it through; an op→value edge carries the output ``index``; both
carry the tensor's ``shape`` and ``dtype``. Every
node's payload is one small dataclass under the ``"data"`` key, read through the typed helpers
(:meth:`PruneGraph.op`, :meth:`PruneGraph.producer`, :meth:`PruneGraph.consumers`, ...).

Node ids are the source's names (fx node names for torch, ONNX node/tensor names for ONNX), so
every message points at something the user can find. Parameter tensors live in ``weights``
(name → numpy array), referenced by :attr:`Value.param`, so copying a graph is cheap.

Both frontends (``graphprune.capture``) produce the same normalised op kinds (``OP_KINDS``); the
coupling pass (``graphprune.passes.coupling``) and every later pass read only this IR.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import networkx as nx
import numpy as np

from graphprune.ir.quant import QuantSpec
from graphprune.ir.symbolic import eval_dim

T = TypeVar("T")

# Normalised op kinds. The frontends map every source op onto one of these (or "unknown", which
# the coupling pass treats as opaque: whatever flows through it is frozen, with a reason).
OP_KINDS = frozenset(
    {
        "conv", "conv_transpose", "linear", "matmul", "outer", "embedding",
        "add", "sub", "mul", "div", "pow", "where", "maximum", "minimum", "elementwise",
        "activation", "identity", "cast",
        "batch_norm", "layer_norm", "group_norm", "instance_norm",
        "cat", "split", "chunk", "slice", "select", "unbind", "stack",
        "reshape", "flatten", "permute", "transpose", "unsqueeze", "squeeze", "expand", "repeat",
        "pool", "adaptive_pool", "global_pool", "reduce", "softmax",
        "sdpa", "getitem", "creation", "upsample", "pad", "unknown",
    }
)  # fmt: skip


@dataclass
class OpNode:
    """One operation. ``kind`` is normalised; ``attrs`` holds the normalised attributes the
    coupling rules need (axis, perm, groups, ...); ``source`` is the op's name in the source
    (fx target such as ``aten.conv2d.default`` or ONNX ``op_type``)."""

    kind: str
    source: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Value:
    """One tensor. ``role`` is ``input`` | ``output`` | ``activation`` | ``param`` | ``const``.

    For parameters, ``param`` is the state-dict (torch) or initializer (ONNX) name of the weight
    in :attr:`PruneGraph.weights`; ``dim_roles`` names each dimension once an op reads it
    (``out_channels``, ``in_channels``, ``features``, ...)."""

    shape: tuple[int, ...] | None
    dtype: str
    role: str = "activation"
    param: str | None = None
    dim_roles: tuple[str, ...] | None = None
    trainable: bool = True  # False for buffers (BN running statistics, rotary tables, ...)
    #: Per axis, the size as an expression over the graph's dynamic dim names (``"batch"``,
    #: ``"17*batch"``; see :mod:`graphprune.ir.symbolic`), ``None`` for a static axis; ``None``
    #: for a value with no dynamic axis. ``shape`` holds the sizes at the example inputs.
    #: Channel axes are always static.
    symbols: tuple[str | None, ...] | None = None


@dataclass(frozen=True)
class DynamicAxis:
    """A model input axis that stays symbolic: axis ``axis`` of input ``input`` is the dim
    ``name``, any size in ``[min, max]`` (``max`` None: unbounded); ``size`` is its size in the
    example inputs; ``note`` says why the range is narrower than asked, if it is."""

    input: str
    axis: int
    name: str
    min: int
    max: int | None
    size: int
    note: str = ""

    def describe(self) -> str:
        hi = "inf" if self.max is None else str(self.max)
        return f"{self.input}[{self.axis}] = {self.name} in [{self.min}, {hi}]"


class PruneGraph:
    """A captured model: ops, values, parameters.

    Parameters
    ----------
    frontend : str
        ``"torch"`` or ``"onnx"``.
    capture_method : str
        How the graph was captured (``torch.export``, ``torch.fx.symbolic_trace -> torch.export``,
        ``onnx-graphsurgeon``).

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> pg = gp.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    >>> [pg.op(n).kind for n in pg.ops()]
    ['linear']
    """

    def __init__(self, frontend: str, capture_method: str, name: str = "model"):
        self.nx = nx.MultiDiGraph()
        self.frontend = frontend
        self.capture_method = capture_method
        self.name = name
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.weights: dict[str, np.ndarray] = {}
        # Sparsity masks by parameter name (True = kept), recorded by ``graphprune.sparsify``.
        self.masks: dict[str, np.ndarray] = {}
        # INT8 quantization by parameter name (same keys as ``masks``), recorded by
        # ``graphprune.quantize``; see :mod:`graphprune.ir.quant`.
        self.quant: dict[str, QuantSpec] = {}
        # Other names of the same tensor (tied weights: ``lm_head.weight`` for
        # ``model.embed_tokens.weight``), keyed by the name in :attr:`weights`.
        self.aliases: dict[str, tuple[str, ...]] = {}
        # Input axes kept symbolic (batch, sequence) and, for axes asked to be dynamic that could
        # not be, ``"input[axis]"`` -> why. Values name their symbolic axes in ``Value.symbols``.
        self.dynamic_axes: list[DynamicAxis] = []
        self.static_axes: dict[str, str] = {}
        # Frontend-private data the writers need (the ExportedProgram, the ONNX model, ...).
        self.source: Any = None
        self._cache: dict[str, Any] = {}

    def param_names(self, name: str) -> tuple[str, ...]:
        """``name`` and every other name the same parameter is reachable by (tied weights)."""
        return (name, *self.aliases.get(name, ()))

    def dim_sizes(self) -> dict[str, int]:
        """Each dynamic dim's size in the example inputs, by name."""
        return {a.name: a.size for a in self.dynamic_axes}

    def dim_ranges(self) -> dict[str, tuple[int, int | None]]:
        """Each dynamic dim's allowed ``(min, max)``, by name."""
        return {a.name: (a.min, a.max) for a in self.dynamic_axes}

    def shape_at(self, v: str, sizes: dict[str, int] | None = None,
                 shape: tuple[int, ...] | None = None) -> tuple[int, ...]:  # fmt: skip
        """Value ``v``'s shape with its symbolic axes evaluated at ``sizes`` (dim name -> size;
        unnamed dims keep their example size). ``shape`` replaces the example shape (a planned
        shape after removal: channel axes changed, symbolic axes not).

        Examples
        --------
        >>> import torch, graphprune as gp
        >>> pg = gp.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
        >>> out = pg.outputs[0]
        >>> pg.value(out).shape, pg.shape_at(out, {"batch": 5})
        ((2, 3), (5, 3))
        """
        val = self.value(v)
        base = tuple(val.shape or ()) if shape is None else tuple(shape)
        if not sizes or not val.symbols:
            return base
        at = {**self.dim_sizes(), **sizes}
        out = list(base)
        for i, expr in enumerate(val.symbols[: len(out)]):
            if expr is not None:
                n = eval_dim(expr, at)
                out[i] = out[i] if n is None else n
        return tuple(out)

    # -- construction --------------------------------------------------------------------------
    def add_value(self, vid: str, value: Value) -> str:
        self.nx.add_node(vid, data=value, is_op=False)
        return vid

    def add_op(self, oid: str, op: OpNode, inputs: list[str | None], outputs: list[str]) -> str:
        if oid in self.nx:
            raise ValueError(f"duplicate node id {oid!r}")
        self.nx.add_node(oid, data=op, is_op=True)
        # Every edge is one tensor use and carries its shape and dtype, so a plain networkx
        # consumer (a drawing, a JSON dump) sees them without reading node payloads.
        for slot, vid in enumerate(inputs):
            if vid is not None:
                v = self.value(vid)
                self.nx.add_edge(vid, oid, slot=slot, shape=v.shape, dtype=v.dtype)
        for index, vid in enumerate(outputs):
            v = self.value(vid)
            self.nx.add_edge(oid, vid, index=index, shape=v.shape, dtype=v.dtype)
        return oid

    # -- typed access --------------------------------------------------------------------------
    def is_op(self, n: str) -> bool:
        return self.nx.nodes[n]["is_op"]

    def op(self, n: str) -> OpNode:
        return self.nx.nodes[n]["data"]

    def value(self, n: str) -> Value:
        return self.nx.nodes[n]["data"]

    def ops(self) -> Iterator[str]:
        """Op ids in topological order."""
        topo = self.cached("topo", lambda g: [n for n in nx.topological_sort(g.nx) if g.is_op(n)])
        return iter(topo)

    def values(self) -> Iterator[str]:
        return (n for n, d in self.nx.nodes(data=True) if not d["is_op"])

    def op_inputs(self, o: str) -> list[str | None]:
        """Input value ids of op ``o`` by slot (``None`` for a slot with no tensor)."""
        edges = [(d["slot"], u) for u, _, d in self.nx.in_edges(o, data=True)]
        if not edges:
            return []
        slots: list[str | None] = [None] * (max(s for s, _ in edges) + 1)
        for s, u in edges:
            slots[s] = u
        return slots

    def op_outputs(self, o: str) -> list[str]:
        return [v for _, v, _ in sorted(self.nx.out_edges(o, data=True), key=lambda e: e[2]["index"])]

    def producer(self, v: str) -> str | None:
        preds = list(self.nx.predecessors(v))
        return preds[0] if preds else None

    def consumers(self, v: str) -> list[tuple[str, int]]:
        """``(op id, slot)`` for every use of value ``v``."""
        return [(o, d["slot"]) for _, o, d in self.nx.out_edges(v, data=True)]

    def params(self) -> Iterator[str]:
        return (v for v in self.values() if self.value(v).role == "param")

    def param(self, o: str, slot: int) -> str | None:
        ins = self.op_inputs(o)
        if slot < len(ins) and ins[slot] is not None and self.value(ins[slot]).role == "param":
            return ins[slot]
        return None

    # -- export --------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The graph as JSON (node-link format; weights are left out, shapes kept)."""
        g = nx.MultiDiGraph()
        for n, d in self.nx.nodes(data=True):
            g.add_node(n, is_op=d["is_op"], **asdict(d["data"]))
        g.add_edges_from(self.nx.edges(data=True))
        data = nx.node_link_data(g, edges="edges")
        data["graph"] = {"frontend": self.frontend, "capture_method": self.capture_method,
                         "inputs": self.inputs, "outputs": self.outputs,
                         "aliases": self.aliases,
                         "dynamic_axes": [asdict(a) for a in self.dynamic_axes],
                         "static_axes": self.static_axes}  # fmt: skip
        return json.dumps(data, default=str, indent=1)

    def to_text(self) -> str:
        """A deterministic listing, one op per line: ``out = kind(in, ...)  # shapes``."""
        lines = []
        for o in self.ops():
            ins = ", ".join(i or "_" for i in self.op_inputs(o))
            outs = self.op_outputs(o)
            shapes = " ".join(str(list(self.value(v).shape or ())) for v in outs)
            lines.append(f"{', '.join(outs)} = {self.op(o).kind}({ins})  # {shapes}")
        return "\n".join(lines)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for o in self.ops():
            kinds[self.op(o).kind] = kinds.get(self.op(o).kind, 0) + 1
        n_params = sum(int(np.prod(self.value(v).shape or ())) for v in self.params())
        top = ", ".join(f"{k}×{c}" for k, c in sorted(kinds.items(), key=lambda kv: -kv[1]))
        return (f"PruneGraph {self.name!r} ({self.frontend}, via {self.capture_method}): "
                f"{sum(kinds.values())} ops, {n_params:,} parameters; {top}")  # fmt: skip

    def __repr__(self) -> str:
        return self.summary()

    # -- analyses (cached) ---------------------------------------------------------------------
    def cached(self, key: str, compute: Callable[[PruneGraph], T]) -> T:
        """The result of an analysis of this graph, computed on first use and kept.

        Each analysis stores its result under its own ``key`` (``"coupling"`` for
        :func:`graphprune.passes.coupling.build_coupling`) and reads no other analysis' entry, so
        the IR needs no knowledge of the passes above it. The graph's structure does not change
        after capture (passes write new models, not new graphs), so entries never go stale.
        """
        if key not in self._cache:
            self._cache[key] = compute(self)
        return self._cache[key]
