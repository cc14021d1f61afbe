"""The protocol a frontend's capture object fulfils (``PruneGraph.source``).

Passes never look inside a captured model: they ask its source to run it, to map its nodes to IR
values, and to write results back. Each frontend implements this protocol once
(:class:`graphprune.frontends.torch.source.TorchSource`,
:class:`graphprune.frontends.onnx.source.OnnxSource`); adding a frontend means implementing it,
not editing the passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Protocol

if TYPE_CHECKING:
    from graphprune.ir.graph import PruneGraph
    from graphprune.ir.plan import RemovalPlan


class Source(Protocol):
    """What a frontend attaches to the graph it captured."""

    frontend: str  # "torch" | "onnx"

    def observe(self, batches: Iterable[tuple], values: Collection[str],
                fn: Callable[[str, Any], None]) -> None:  # fmt: skip
        """Run the captured model on each batch (no gradients) and call ``fn(value_id, tensor)``
        for each value in ``values`` as it is computed. Frontends that cannot run calibration
        data raise :class:`~graphprune.ir.errors.ConfigError` saying which criteria work."""

    def apply_plan(self, pg: PruneGraph, plan: RemovalPlan, verify: bool = True) -> Any:
        """A new model in the frontend's own form with the plan's positions removed; checked by
        running it when ``verify`` (a :class:`~graphprune.ir.errors.VerificationError` names
        the node at fault)."""

    def bypass(self, pg: PruneGraph, replace: dict[str, str]) -> Any:
        """A new model where each op ``o`` in ``replace`` is removed and its output is replaced
        by the value ``replace[o]`` (depth pruning drops ``x + f(x)`` to ``x``); ops left without
        users are removed too."""
