"""Group importance from weights: magnitude (L1/L2) aggregated over every coupled member.

A group's score for index i sums, over each parameter member, the norm of the positions whose
leaf-coordinate is i (a head's score sums its q, k, v rows and its o_proj columns). Runs after
``BuildCoupling``; reads weights from the graph's store, never the model.
"""

from __future__ import annotations

import numpy as np

from graphprune.ir import PruneGraph
from graphprune.passes.coupling import Group
from graphprune.passes.coupling import build_coupling


def magnitude_scores(pg: PruneGraph, group: Group, p: int = 2) -> np.ndarray:
    """Per-index score of ``group``: sum over its parameter members of ||slice||_p^p."""
    cp = build_coupling(pg)
    scores = np.zeros(group.size, dtype=np.float64)
    for m in group.params:
        w = np.asarray(pg.weights[m.param], dtype=np.float64)
        if w.ndim == 0:
            continue
        per_pos = np.abs(np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)) ** p
        per_pos = per_pos.sum(axis=1)
        coords = cp.coords(cp.axis_var[(m.value, m.axis)], group.var)
        ok = coords >= 0
        scores += np.bincount(coords[ok], weights=per_pos[ok], minlength=group.size)
    return scores


def lowest(scores: np.ndarray, ratio: float) -> list[int]:
    """Indices of the ``ratio`` fraction with the lowest scores (always keeps at least one)."""
    k = min(int(np.floor(ratio * len(scores))), len(scores) - 1)
    return sorted(np.argsort(scores, kind="stable")[:k].tolist())
