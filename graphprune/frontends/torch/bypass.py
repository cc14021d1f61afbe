"""Bypass ops in a captured torch program (depth pruning: ``x + f(x)`` → ``x``)."""

from __future__ import annotations

import torch

from graphprune.ir import PruneGraph
from graphprune.ir.reach import dead_after_bypass, resolve


def bypass_ops(gm: torch.fx.GraphModule, value_ids: dict[str, str], pg: PruneGraph,
               replace: dict[str, str]) -> torch.fx.GraphModule:  # fmt: skip
    """``gm`` (a private copy, changed in place and returned) with each op in ``replace``
    returning ``replace[op]`` instead; ops and parameters nothing reads any more are removed.
    ``value_ids`` maps ``gm``'s node names to IR value ids."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node_of = {v: nodes[n] for n, v in value_ids.items()}
    for op, value in replace.items():
        nodes[op].replace_all_uses_with(node_of[resolve(pg, replace, value)])
    gone = dead_after_bypass(pg, replace)

    def impure(n: torch.fx.Node) -> bool:
        # Metadata asserts on a dropped branch's tensors would keep the branch alive.
        if n.name in gone or any(isinstance(a, torch.fx.Node) and a.name in gone
                                 for a in n.all_input_nodes):  # fmt: skip
            return False
        return n.is_impure()

    gm.graph.eliminate_dead_code(is_impure_node=impure)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            if leaf in owner._parameters:
                del owner._parameters[leaf]
            elif leaf in owner._buffers:
                del owner._buffers[leaf]
    gm.recompile()
    return gm
