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


def same_bytes(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether two imported constants certainly hold the same tensor, told from their ONNX bytes
    without loading them (onnx-graphsurgeon keeps what it loads: comparing two folds of a model
    by values would hold two more copies of its weights). ``False`` when it cannot be told so."""
    la, lb = getattr(a, "_values", None), getattr(b, "_values", None)
    ta, tb = getattr(la, "tensor", None), getattr(lb, "tensor", None)
    if ta is None or tb is None or ta.data_type != tb.data_type or list(ta.dims) != list(tb.dims):
        return False
    return bool(ta.raw_data) and ta.raw_data == tb.raw_data
