"""The IR verifier: :func:`verify` checks that a :class:`PruneGraph` is well formed.

Checks, each raising :class:`~graphprune.ir.errors.VerificationError` that names the node:

* every node carries its payload (:class:`OpNode` on op nodes, :class:`Value` on value nodes) and
  every op kind is a normalised one (``OP_KINDS``);
* the graph is bipartite (every edge joins an op and a value) and acyclic;
* a value has at most one producer; an op reads each argument slot and writes each output index
  once;
* every edge carries the ``shape`` and ``dtype`` of its value (``add_op`` copies them);
* the graph's inputs and outputs are value nodes;
* every parameter value's weight is in ``pg.weights`` with the value's shape;
* every mask in ``pg.masks`` belongs to a weight, has its shape and is boolean;
* every :class:`~graphprune.ir.quant.QuantSpec` in ``pg.quant`` belongs to a weight, has one
  finite scale > 0 per channel along its axis.

Frontends produce graphs that pass; :func:`graphprune.passes.base.run_passes` calls it after every
pass when asked (tests), so a pass that corrupts the graph is named. It walks the whole graph:
linear in nodes and edges, not for inner loops.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from graphprune.ir.errors import VerificationError
from graphprune.ir.graph import OP_KINDS, OpNode, PruneGraph, Value


def verify(pg: PruneGraph) -> None:
    """Raise :class:`VerificationError` naming the first node that breaks an IR invariant.

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> pg = gp.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    >>> verify(pg)
    >>> pg.masks["weight"] = np.ones((3, 5), dtype=bool)
    >>> verify(pg)
    Traceback (most recent call last):
    ...
    graphprune.ir.errors.VerificationError: Linear: mask of 'weight' has shape (3, 5), ...
    """
    _check_payloads(pg)
    _check_edges(pg)
    _check_acyclic(pg)
    _check_boundary(pg)
    _check_weights(pg)
    _check_masks(pg)
    _check_quant(pg)


def _fail(pg: PruneGraph, message: str) -> VerificationError:
    return VerificationError(f"{pg.name}: {message}")


def _check_payloads(pg: PruneGraph) -> None:
    for n, d in pg.nx.nodes(data=True):
        if "is_op" not in d or "data" not in d:
            raise _fail(pg, f"node {n!r} has no payload (add nodes with add_op/add_value)")
        want = OpNode if d["is_op"] else Value
        if not isinstance(d["data"], want):
            raise _fail(pg, f"node {n!r} is {'an op' if d['is_op'] else 'a value'} but carries "
                            f"a {type(d['data']).__name__}, not a {want.__name__}")  # fmt: skip
        if d["is_op"] and d["data"].kind not in OP_KINDS:
            raise _fail(pg, f"op {n!r} has kind {d['data'].kind!r}, not a normalised op kind")


def _check_edges(pg: PruneGraph) -> None:
    for o in (n for n in pg.nx if pg.is_op(n)):
        kind = pg.op(o).kind
        for key, edges, other in (("slot", pg.nx.in_edges(o, data=True), 0),
                                  ("index", pg.nx.out_edges(o, data=True), 1)):  # fmt: skip
            seen: set[int] = set()
            for e in edges:
                v, d = e[other], e[2]
                if pg.is_op(v):
                    raise _fail(pg, f"op {o!r} ({kind}) is joined directly to op {v!r}: "
                                    "ops connect only through values")  # fmt: skip
                if key not in d:
                    raise _fail(pg, f"op {o!r} ({kind}): the edge to {v!r} has no {key}")
                if d[key] in seen:
                    raise _fail(pg, f"op {o!r} ({kind}) has two edges at {key} {d[key]}")
                seen.add(d[key])
                val = pg.value(v)
                shape = None if d.get("shape") is None else tuple(d["shape"])
                if shape != (None if val.shape is None else tuple(val.shape)) or (
                        d.get("dtype") != val.dtype):
                    raise _fail(pg, f"op {o!r} ({kind}): the edge at {key} {d[key]} carries "
                                    f"{shape} {d.get('dtype')}, value {v!r} is {val.shape} "
                                    f"{val.dtype}")  # fmt: skip
    for v in (n for n in pg.nx if not pg.is_op(n)):
        other = next((w for w in pg.nx.successors(v) if not pg.is_op(w)), None)
        if other is not None:
            raise _fail(pg, f"value {v!r} is joined directly to value {other!r}: values "
                            "connect only through ops")  # fmt: skip
        preds = list(pg.nx.predecessors(v))
        if len(preds) > 1:
            raise _fail(pg, f"value {v!r} has {len(preds)} producers: {sorted(preds)}")


def _check_acyclic(pg: PruneGraph) -> None:
    if not nx.is_directed_acyclic_graph(pg.nx):
        cycle = [u for u, *_ in nx.find_cycle(pg.nx)]
        raise _fail(pg, f"the graph has a cycle through {cycle[0]!r}: {' -> '.join(cycle)}")


def _check_boundary(pg: PruneGraph) -> None:
    for what, names in (("input", pg.inputs), ("output", pg.outputs)):
        for v in names:
            if v not in pg.nx or pg.is_op(v):
                raise _fail(pg, f"graph {what} {v!r} is not a value node")


def _check_weights(pg: PruneGraph) -> None:
    for v in pg.params():
        val = pg.value(v)
        if val.param not in pg.weights:
            raise _fail(pg, f"parameter value {v!r} names weight {val.param!r}, which is not in "
                            "pg.weights")  # fmt: skip
        w = np.shape(pg.weights[val.param])
        if val.shape is not None and tuple(w) != tuple(val.shape):
            raise _fail(pg, f"parameter value {v!r} has shape {tuple(val.shape)}, its weight "
                            f"{val.param!r} {tuple(w)}")  # fmt: skip


def _check_masks(pg: PruneGraph) -> None:
    for name, mask in pg.masks.items():
        if name not in pg.weights:
            raise _fail(pg, f"mask {name!r} belongs to no weight in pg.weights")
        w = tuple(np.shape(pg.weights[name]))
        if tuple(np.shape(mask)) != w:
            raise _fail(pg, f"mask of {name!r} has shape {tuple(np.shape(mask))}, its weight {w}")
        if np.asarray(mask).dtype != np.bool_:
            raise _fail(pg, f"mask of {name!r} has dtype {np.asarray(mask).dtype}, not bool")


def _check_quant(pg: PruneGraph) -> None:
    for name, spec in pg.quant.items():
        if name not in pg.weights:
            raise _fail(pg, f"quantization spec {name!r} belongs to no weight in pg.weights")
        w = tuple(np.shape(pg.weights[name]))
        if not -len(w) <= spec.axis < len(w):
            raise _fail(pg, f"quantization of {name!r}: axis {spec.axis} is out of range for its "
                            f"weight {w}")  # fmt: skip
        s = np.asarray(spec.weight_scale)
        if s.shape != (w[spec.axis],):
            raise _fail(pg, f"quantization of {name!r}: weight_scale has shape {s.shape}, want "
                            f"({w[spec.axis]},) (one per channel along axis {spec.axis} of {w})")
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise _fail(pg, f"quantization of {name!r}: weight_scale must be finite and > 0 "
                            f"(min {s.min()!r})")  # fmt: skip
        a = spec.act_scale
        if a is not None and not (np.isfinite(a) and a > 0):
            raise _fail(pg, f"quantization of {name!r}: act_scale {a!r} must be finite and > 0")
