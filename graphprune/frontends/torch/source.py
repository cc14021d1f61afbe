""":class:`TorchSource`: the torch frontend's side of :class:`graphprune.ir.source.Source`.

Holds the ``ExportedProgram`` of the captured model, the example inputs it was captured with,
and the one map from fx node names to IR value ids (made during capture). Everything that runs,
reads or rewrites a captured torch model goes through it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

import torch

from graphprune.frontends.torch.nodes import get_tensor

if TYPE_CHECKING:
    from graphprune.ir import PruneGraph, RemovalPlan


@dataclass
class TorchSource:
    """The captured program and how its nodes map to the IR.

    ``value_of`` maps fx node names (placeholders and call_function nodes, the same in the
    program's graph and in :meth:`graph_module`'s) to value ids; ``param_value`` maps parameter
    and buffer names (``get_attr`` targets) to value ids.
    """

    program: Any  # torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    value_of: dict[str, str] = field(default_factory=dict)
    param_value: dict[str, str] = field(default_factory=dict)
    frontend: str = "torch"

    # -- the program ----------------------------------------------------------------------------
    def graph_module(self, fresh: bool = True) -> torch.fx.GraphModule:
        """The captured program as a ``GraphModule``; ``fresh`` gives a private deep copy that
        the caller may modify (otherwise parameters are shared with the program: read only)."""
        gm = self.program.module()
        return copy.deepcopy(gm) if fresh else gm

    def value_ids(self, gm: torch.fx.GraphModule) -> dict[str, str]:
        """fx node name → IR value id for the nodes of ``gm`` (a :meth:`graph_module`)."""
        out = {}
        for n in gm.graph.nodes:
            v = self.param_value.get(n.target) if n.op == "get_attr" else self.value_of.get(n.name)
            if v is not None:
                out[n.name] = v
        return out

    def parameters(self, gm: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor ``gm``'s graph reads with ``get_attr``, by name (tied weights once)."""
        return {n.target: get_tensor(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}

    def run(self, module: torch.nn.Module | None = None) -> Any:
        """``module`` (default: the captured program) on the example inputs, without grad."""
        with torch.no_grad():
            return (module or self.graph_module(fresh=False))(*self.args, **self.kwargs)

    # -- Source protocol ------------------------------------------------------------------------
    def observe(self, batches: Iterable[tuple], values: Collection[str],
                fn: Callable[[str, Any], None]) -> None:  # fmt: skip
        gm = self.graph_module(fresh=False)
        vid = self.value_ids(gm)
        wanted = set(values)
        n_in = len(self.args) + len(self.kwargs)

        class Probe(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                v = vid.get(n.name)
                if v in wanted and isinstance(out, torch.Tensor):
                    fn(v, out)
                return out

        with torch.no_grad():
            for b in batches:
                Probe(gm).run(*b[:n_in])

    def apply_plan(self, pg: PruneGraph, plan: RemovalPlan, verify: bool = True) -> Any:
        from graphprune.frontends.torch.graph_module import apply_plan_torch

        return apply_plan_torch(pg, plan, verify=verify)

    def module_form(self, model: torch.nn.Module, pg: PruneGraph, plan: RemovalPlan,
                    reference: torch.nn.Module, inplace: bool = False) -> torch.nn.Module | None:  # fmt: skip
        """The plan applied to (a copy of) the user's own module, or None when the module's
        forward hard-codes sizes (then :meth:`apply_plan`'s GraphModule is the result)."""
        from graphprune.frontends.torch.module_form import module_form

        return module_form(model, pg, plan, reference, inplace=inplace)

    def bypass(self, pg: PruneGraph, replace: dict[str, str]) -> torch.fx.GraphModule:
        from graphprune.frontends.torch.bypass import bypass_ops
        from graphprune.frontends.torch.dynamic import install_input_check

        gm = self.graph_module()
        gm = bypass_ops(gm, self.value_ids(gm), pg, replace)
        install_input_check(gm, pg)
        return gm
