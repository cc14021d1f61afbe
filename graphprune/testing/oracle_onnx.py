"""The dead-channel oracle for ONNX graphs (see :mod:`graphprune.testing.oracle`), run with onnxruntime."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.frontends.onnx import session
from graphprune.ir.errors import UnsupportedOpError
from graphprune.testing.common import OracleResult, choose_removal, dead_positions
from graphprune.ir import PruneGraph
from graphprune.passes.prune.plan import plan_removal
from graphprune.passes.coupling import build_coupling


def random_inputs(pg: PruneGraph, seed: int = 0, high: int = 16) -> dict[str, np.ndarray]:
    """Random feeds for ``pg``'s inputs (integers in [0, high) for integer inputs)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in pg.inputs:
        val = pg.value(v)
        if "int" in val.dtype:
            feeds[v] = rng.integers(0, high, size=val.shape).astype(val.dtype)
        elif val.dtype == "bool":
            feeds[v] = np.ones(val.shape, dtype=bool)
        else:
            feeds[v] = rng.standard_normal(val.shape).astype(val.dtype)
    return feeds


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    outs = session.run_onnx(model, feeds, threads=1, optimize=False)
    return [np.asarray(o, dtype=np.float64) for o in outs]


def run_oracle_onnx(pg: PruneGraph, gid: int, indices: Iterable[int] | None = None,
                    seed: int = 0, feeds: dict[str, np.ndarray] | None = None):  # fmt: skip
    removal = choose_removal(pg, gid, indices, seed)
    plan = plan_removal(pg, removal)
    ref = dead_reference_onnx(pg, removal, plan)
    pruned = pg.source.apply_plan(pg, plan)
    runs = [feeds or random_inputs(pg, seed)]
    if pg.source.dynamic is not None:  # symbolic dims kept: compare at every checked size
        ref = pg.source.dynamic.restore(ref)
        runs += [pg.source.feeds(pg, sizes, seed) for sizes in pg.source.dynamic.other_sizes()]
    r, p = [], []
    for f in runs:
        r += run_onnx(ref, f)
        p += run_onnx(pruned, f)
    diff = max(float(np.abs(a - b).max()) if a.shape == b.shape else np.inf for a, b in zip(r, p))
    first = next(iter(removal))
    return OracleResult(first, removal[first], r, p, diff)


def dead_reference_onnx(pg: PruneGraph, removal: dict[int, list[int]], plan=None) -> onnx.ModelProto:
    """``pg``'s model with ``removal``'s channels made dead (member initializer slices zeroed)."""
    from graphprune.frontends.onnx.writeback import map_constants

    plan = plan or plan_removal(pg, removal)
    ref_graph = pg.source.graph_copy()
    members: dict[str, list] = {}
    for g in removal:
        for m in build_coupling(pg).groups[g].params:
            if not _is_bn_var(pg, m.value):
                members.setdefault(m.value, []).append(m)

    def kill(vid: str, arr: np.ndarray) -> np.ndarray | None:
        if vid not in members:
            return None
        for m in members[vid]:
            dead = dead_positions(plan, m.value, m.axis, arr.shape[m.axis])
            sl = [slice(None)] * arr.ndim
            sl[m.axis] = dead
            arr[tuple(sl)] = 0
        return arr

    map_constants(ref_graph, pg, kill)
    ops = {note.split(":")[0] for g in removal for note in build_coupling(pg).groups[g].reductions}
    if ops:
        _mask_reductions(ref_graph, pg, plan, ops)
    return pg.source.export(ref_graph)


def _mask_reductions(graph: gs.Graph, pg: PruneGraph, plan, ops: set[str]) -> None:
    """Each reduction over a pruned axis computes over the kept positions only, as the pruned
    model does: its input is gathered to the kept positions, and where the op keeps the axis
    (LayerNormalization, Softmax) the result is scattered back with zeros at the dead ones."""
    nodes = {n.name: n for n in graph.nodes}
    for op in sorted(ops):
        n = nodes.get(op)
        if n is None:
            raise UnsupportedOpError(f"ONNX oracle: reduction node {op!r} not found")
        x = n.inputs[0]
        rank = len(pg.value(x.name).shape)
        if n.op in ("LayerNormalization", "SimplifiedLayerNormalization"):
            if pg.op(op).attrs.get("normalized_ndim", 1) != 1:
                raise UnsupportedOpError(f"ONNX oracle cannot mask {n.op} at {op!r} over "
                                         "several axes")  # fmt: skip
            axes, scatter = [rank - 1], True
        elif n.op == "InstanceNormalization":  # what GroupNorm exports to, over (B, G, rest)
            axes, scatter = list(range(2, rank)), True
        elif n.op in ("Softmax", "LogSoftmax"):
            axes, scatter = [pg.op(op).attrs["axis"]], True
        elif n.op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2",
                      "ReduceSumSquare"):  # fmt: skip
            axes, scatter = list(pg.op(op).attrs["axes"]), False
        else:
            raise UnsupportedOpError(f"ONNX oracle cannot mask reduction {n.op} at {op!r}")
        kept = {a: plan.kept(x.name, a) for a in axes if plan.kept(x.name, a) is not None}
        if not kept:
            continue
        cur: gs.Tensor = x
        for a, k in kept.items():
            cur = graph.layer(op="Gather", inputs=[cur, gs.Constant(f"{op}_gp_keep{a}", k)],
                              attrs={"axis": a}, outputs=[f"{op}_gp_kept{a}"])[0]  # fmt: skip
        n.inputs[0] = cur
        if n.op in ("LayerNormalization", "SimplifiedLayerNormalization"):
            k = kept[rank - 1]
            for i in (1, 2):
                if i < len(n.inputs) and isinstance(n.inputs[i], gs.Constant):
                    arr = np.asarray(n.inputs[i].values)
                    n.inputs[i] = gs.Constant(f"{op}_gp_param{i}", np.take(arr, k, axis=-1))
        if not scatter:
            continue
        out = n.outputs[0]
        inner = gs.Variable(f"{op}_gp_masked", dtype=out.dtype)
        n.outputs[0] = inner
        if len(kept) != 1:
            raise UnsupportedOpError(f"ONNX oracle cannot mask {n.op} at {op!r} pruned along "
                                     f"several axes {sorted(kept)}")  # fmt: skip
        (a, k), = kept.items()
        # Scatter back by a one-hot MatMul over the last axis: exact (one nonzero term per
        # output) and free of static shapes, so it runs at every size of a symbolic batch.
        size = pg.value(x.name).shape[a]
        onehot = np.zeros((len(k), size), dtype=pg.value(x.name).dtype)  # fp16 models too
        onehot[np.arange(len(k)), k] = 1
        perm = [i for i in range(rank) if i != a] + [a]
        back = [perm.index(i) for i in range(rank)]
        cur = inner
        if a != rank - 1:
            cur = graph.layer(op="Transpose", inputs=[cur], attrs={"perm": perm},
                              outputs=[f"{op}_gp_t"])[0]  # fmt: skip
        cur = graph.layer(op="MatMul", inputs=[cur, gs.Constant(f"{op}_gp_onehot", onehot)],
                          outputs=[f"{op}_gp_scattered" if a != rank - 1 else out])[0]  # fmt: skip
        if a != rank - 1:
            graph.layer(op="Transpose", inputs=[cur], attrs={"perm": back}, outputs=[out])
    graph.cleanup().toposort()


def _is_bn_var(pg: PruneGraph, value: str) -> bool:
    for op, slot in pg.consumers(value):
        if pg.op(op).kind == "batch_norm" and slot == 4:
            return True
    return False
