"""The dead-channel oracle for ONNX graphs (see :mod:`graphprune.testing.oracle`), run with onnxruntime."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

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
    for g in removal:
        group = build_coupling(pg).groups[g]
        if group.reductions:
            raise UnsupportedOpError(
                f"group {g} is reduced without weights ({group.reductions[0]}); the ONNX oracle "
                "only checks exact groups"
            )
    plan = plan_removal(pg, removal)
    ref = dead_reference_onnx(pg, removal, plan)
    pruned = pg.source.apply_plan(pg, plan)
    feeds = feeds or random_inputs(pg, seed)
    r, p = run_onnx(ref, feeds), run_onnx(pruned, feeds)
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
    return pg.source.export(ref_graph)


def _is_bn_var(pg: PruneGraph, value: str) -> bool:
    for op, slot in pg.consumers(value):
        if pg.op(op).kind == "batch_norm" and slot == 4:
            return True
    return False
