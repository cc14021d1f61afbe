""":class:`OnnxSource`: the ONNX frontend's side of :class:`graphprune.ir.source.Source`.

Holds the loaded model, its onnx-graphsurgeon graph (after shape inference) and which IR value
each constant input of each node is. IR value ids are the ONNX tensor names, so the node → value
map is the identity on names; constant *uses* are the one thing that needs a table.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.ir.errors import ConfigError

if TYPE_CHECKING:
    from graphprune.frontends.onnx.shapes import DynamicDims
    from graphprune.ir import PruneGraph, RemovalPlan


@dataclass
class OnnxSource:
    model: onnx.ModelProto
    graph: gs.Graph
    const_uses: dict[tuple[str, int], str] = field(default_factory=dict)
    frontend: str = "onnx"
    #: the inputs given to capture, by input name (``None``: synthesised when needed)
    example_feeds: dict[str, np.ndarray] | None = None
    #: how the model's symbolic input dims were fixed for analysis, and how to restore them
    dynamic: DynamicDims | None = None
    #: the file the model was loaded from; ``model`` is then its skeleton (no weights)
    path: str | None = None

    def original(self) -> onnx.ModelProto:
        """The model as given, with its weights (reloaded from :attr:`path` if it was a file)."""
        if self.path is None:
            return self.model
        from graphprune.frontends.onnx.files import load_onnx

        return load_onnx(self.path)[0]

    def feeds(self, pg: PruneGraph, sizes: dict[str, int] | None = None,
              seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
        """Inputs for ``pg``'s model: the example inputs at the analysed sizes, else synthesised
        (normal floats, ones for integer and boolean inputs: valid ids and masks), with the
        symbolic dims set to ``sizes`` where given."""
        if self.example_feeds is not None and not sizes:
            return dict(self.example_feeds)
        rng = np.random.default_rng(seed)
        out = {}
        for v in pg.inputs:
            val = pg.value(v)
            shape = self.dynamic.input_shape(v, val.shape, sizes) if self.dynamic else val.shape
            if val.dtype.startswith(("int", "uint")) or val.dtype == "bool":
                out[v] = np.ones(shape, dtype=val.dtype)
            else:
                out[v] = rng.standard_normal(shape).astype(val.dtype)
        return out

    def check_feeds(self, pg: PruneGraph) -> list[dict[str, np.ndarray]]:
        """The inputs a written model is run on before it is returned: the analysed sizes, and for
        a model with symbolic dims one more size of each (the range's other end)."""
        runs = [self.feeds(pg)]
        if self.dynamic is not None:
            for sizes in self.dynamic.other_sizes():
                runs.append(self.feeds(pg, sizes))
        return runs

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
