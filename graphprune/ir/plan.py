"""A removal plan: which positions of which axes survive, as the writers need it.

:func:`graphprune.passes.prune.plan.plan_removal` fills it from the coupling analysis; the
frontends' writers (torch GraphModule, torch module form, ONNX) read only this object and the
graph. It lives in the IR layer so that writers need nothing from the passes above them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RemovalPlan:
    """Kept positions per changed axis, the new shape of every changed value, and the new size of
    every op attribute that counts channels (``groups`` of a grouped conv or GroupNorm).

    ``coupling`` is the analysis the plan was made from (kept for reports and the oracle);
    ``keep`` and ``removed`` are keyed by its variables and group ids.
    """

    coupling: Any
    keep: dict[int, np.ndarray]
    axis_keep: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    new_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    removed: dict[int, np.ndarray] = field(default_factory=dict)
    op_sizes: dict[tuple[str, str], int] = field(default_factory=dict)

    def kept(self, value: str, axis: int) -> np.ndarray | None:
        return self.axis_keep.get((value, axis))

    def changed(self, value: str) -> bool:
        return value in self.new_shapes

    def op_size(self, op: str, attr: str) -> int | None:
        """The new value of op ``op``'s channel-counting attribute ``attr`` (``"groups"``), or
        ``None`` when the op has no such attribute."""
        return self.op_sizes.get((op, attr))


def slice_array(arr: np.ndarray, value: str, plan: RemovalPlan) -> np.ndarray:
    """``arr`` (the data of ``value``) with every changed axis sliced to its kept positions."""
    for a in range(arr.ndim):
        k = plan.kept(value, a)
        if k is not None:
            arr = np.take(arr, k, axis=a)
    return arr
