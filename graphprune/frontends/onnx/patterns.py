"""Rewrites of exporter idioms into the op the torch frontend sees, run in capture after folding.

The legacy exporter writes ``torch.chunk(x, k, dim)`` as ``k`` sibling ``Slice`` nodes with
(once folded) constant bounds. As separate slices the axis is a concatenation of ``k`` parts;
torch capture sees one uniform split, a "chunks × channels per chunk" product, which stays
compatible with a channel shuffle that reshapes the same axis into groups (ShuffleNet). So the
slices are merged into one equal ``Split`` here: the same groups as torch, and a model that
computes the same thing.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphprune.frontends.onnx.nodes import const_input


def _unit_slice(n: gs.Node) -> tuple[int, int, int] | None:
    """``(axis, start, end)`` of a one-axis, unit-step Slice with constant bounds."""
    shape = n.inputs[0].shape
    starts, ends = const_input(n, 1), const_input(n, 2)
    axes, steps = const_input(n, 3), const_input(n, 4)
    if shape is None or starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if (len(n.inputs) > 3 and n.inputs[3].name and axes is None) or (
            steps is not None and int(steps.ravel()[0]) != 1):  # fmt: skip
        return None
    axis = int(axes.ravel()[0]) if axes is not None else 0
    axis %= len(shape)
    size = shape[axis]
    if not isinstance(size, int):
        return None
    s, e, _ = slice(int(starts.ravel()[0]), int(min(ends.ravel()[0], size)), 1).indices(size)
    return axis, s, e


def merge_chunk_slices(graph: gs.Graph, opset: int) -> int:
    """Replace each set of sibling Slices that cut one axis into equal, contiguous, complete
    parts by one equal Split. Returns how many sets were merged."""
    merged = 0
    for t in list(graph.tensors().values()):
        slices = [n for n in t.outputs if n.op == "Slice" and n.inputs[0] is t]
        if len(slices) < 2:
            continue
        cuts = {}
        for n in slices:
            c = _unit_slice(n)
            if c is not None:
                cuts.setdefault(c[0], []).append((c[1], c[2], n))
        for axis, parts in cuts.items():
            parts.sort(key=lambda p: p[0])
            size, k = t.shape[axis], len(parts)
            bounds = [(s, e) for s, e, _ in parts]
            if k < 2 or size % k or bounds != [(i * size // k, (i + 1) * size // k)
                                               for i in range(k)]:  # fmt: skip
                continue
            outs = [n.outputs[0] for _, _, n in parts]
            for _, _, n in parts:
                n.outputs.clear()
            attrs = {"axis": axis}
            if opset >= 18:
                attrs["num_outputs"] = k
            name = f"{parts[0][2].name}_chunk"
            graph.nodes.append(gs.Node("Split", name=name, attrs=attrs, inputs=[t], outputs=outs))
            merged += 1
    if merged:
        graph.cleanup().toposort()
    return merged


__all__ = ["merge_chunk_slices"]
