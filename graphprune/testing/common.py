"""What the torch and ONNX oracles share: the result type and the choice of dead positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphprune.ir import PruneGraph
from graphprune.ir.plan import RemovalPlan
from graphprune.passes.coupling import build_coupling


@dataclass
class OracleResult:
    group: int
    removed: list[int]
    reference: list[np.ndarray]
    pruned: list[np.ndarray]
    max_abs_diff: float

    def assert_close(self, atol: float = 1e-4, rtol: float = 1e-4) -> None:
        for i, (a, b) in enumerate(zip(self.reference, self.pruned)):
            if a.shape != b.shape:
                raise AssertionError(f"group {self.group}: output {i} shape {b.shape} != {a.shape}")
            np.testing.assert_allclose(b, a, atol=atol, rtol=rtol,
                                       err_msg=f"group {self.group}, output {i}")  # fmt: skip


def choose_indices(size: int, rng: np.random.Generator, fraction: float = 0.5) -> list[int]:
    k = min(max(1, int(round(size * fraction))), size - 1)
    return sorted(rng.choice(size, size=k, replace=False).tolist())


def dead_positions(plan: RemovalPlan, value: str, axis: int, size: int) -> np.ndarray:
    k = plan.kept(value, axis)
    return np.array([], dtype=np.int64) if k is None else np.setdiff1d(np.arange(size), k)


def choose_removal(pg: PruneGraph, gid: Any, indices: Any, seed: int) -> dict[int, list[int]]:
    """``{group: indices}`` as given, or ``indices`` (default: a seeded random half) of ``gid``."""
    if isinstance(gid, dict):
        return {g: list(i) for g, i in gid.items()}
    rng = np.random.default_rng(seed + gid)
    size = build_coupling(pg).groups[gid].size
    return {gid: list(indices) if indices is not None else choose_indices(size, rng)}
