"""Minimal structural remover: drop chosen indices of chosen groups and write the model back.

This is the bottom layer of every structural pass and of the test oracle; the pruning passes
(criteria, scopes, schedules) decide *which* indices, this decides nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from graphprune.ir import PruneGraph
from graphprune.passes.prune.plan import plan_removal


def remove_channels(pg: PruneGraph, removal: Mapping[int, Iterable[int]]) -> Any:
    """Remove ``removal[group_id]`` indices from each group and return the smaller model.

    Returns a ``torch.fx.GraphModule`` for a torch capture, an ``onnx.ModelProto`` for ONNX. The
    captured model is not modified.

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pg = gp.capture(m, (torch.randn(2, 4),))
    >>> small = gp.remove_channels(pg, {0: [1, 2, 3]})
    >>> small(torch.randn(2, 4)).shape
    torch.Size([2, 2])
    """
    return pg.source.apply_plan(pg, plan_removal(pg, removal))
