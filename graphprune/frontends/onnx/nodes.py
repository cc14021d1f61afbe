"""Reading ONNX nodes: the constant behind an input, shared by capture and the writers."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def const_input(node: gs.Node, i: int) -> np.ndarray | None:
    if i >= len(node.inputs):
        return None
    t = node.inputs[i]
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None
