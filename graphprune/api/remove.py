"""Minimal structural remover: drop chosen indices of chosen groups and write the model back.

This is the bottom layer of every structural pass and of the test oracle; the pruning passes
(criteria, scopes, schedules) decide *which* indices, this decides nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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
    plan = plan_removal(pg, removal)
    if pg.frontend == "torch":
        from graphprune.frontends.torch.graph_module import apply_plan_torch

        return apply_plan_torch(pg, plan)
    from graphprune.frontends.onnx.writeback import apply_plan_onnx

    return apply_plan_onnx(pg, plan)
