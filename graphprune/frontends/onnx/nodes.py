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
        return constant_value(t.inputs[0])
    return None


def constant_value(node: gs.Node) -> np.ndarray | None:
    """The tensor a ``Constant`` node holds, whichever of its attributes holds it (``value``,
    ``value_int(s)``, ``value_float(s)``; exporters use all of them)."""
    a = node.attrs
    if "value" in a:
        return np.asarray(a["value"].values)
    for key, dtype in (("value_int", np.int64), ("value_ints", np.int64),
                       ("value_float", np.float32), ("value_floats", np.float32)):  # fmt: skip
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    return None
