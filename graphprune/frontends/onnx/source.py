""":class:`OnnxSource`: the ONNX frontend's side of :class:`graphprune.ir.source.Source`.

Holds the loaded model, its onnx-graphsurgeon graph (after shape inference) and which IR value
each constant input of each node is. IR value ids are the ONNX tensor names, so the node → value
map is the identity on names; constant *uses* are the one thing that needs a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

import onnx
import onnx_graphsurgeon as gs

from graphprune.ir.errors import ConfigError

if TYPE_CHECKING:
    from graphprune.ir import PruneGraph, RemovalPlan


@dataclass
class OnnxSource:
    model: onnx.ModelProto
    graph: gs.Graph
    const_uses: dict[tuple[str, int], str] = field(default_factory=dict)
    frontend: str = "onnx"

    def graph_copy(self) -> gs.Graph:
        return self.graph.copy()

    def export(self, graph: gs.Graph) -> onnx.ModelProto:
        """``graph`` as a ModelProto with the captured model's opsets and IR version."""
        model = gs.export_onnx(graph)
        model.ir_version = self.model.ir_version
        model.ClearField("opset_import")
        model.opset_import.extend(self.model.opset_import)
        return model

    # -- Source protocol ------------------------------------------------------------------------
    def observe(self, batches: Iterable[tuple], values: Collection[str],
                fn: Callable[[str, Any], None]) -> None:  # fmt: skip
        raise ConfigError("data-driven criteria need a torch capture; for ONNX use l1, l2, fpgm, "
                          "bn_scale or random")  # fmt: skip

    def apply_plan(self, pg: PruneGraph, plan: RemovalPlan, verify: bool = True) -> onnx.ModelProto:
        from graphprune.frontends.onnx.writeback import apply_plan_onnx

        return apply_plan_onnx(pg, plan, verify=verify)

    def bypass(self, pg: PruneGraph, replace: dict[str, str]) -> onnx.ModelProto:
        """The model with each op in ``replace`` bypassed (checked with onnx.checker)."""
        from graphprune.ir.reach import resolve

        graph = self.graph_copy()
        tensors = graph.tensors()
        by_name = {n.name: n for n in graph.nodes}
        for op, value in replace.items():
            node = by_name[op]
            out, skip = node.outputs[0], tensors[resolve(pg, replace, value)]
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = skip
            graph.outputs = [skip if t is out else t for t in graph.outputs]
            node.outputs.clear()
        graph.cleanup().toposort()
        model = self.export(graph)
        onnx.checker.check_model(model)
        return model
