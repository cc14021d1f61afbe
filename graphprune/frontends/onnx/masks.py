"""Sparsity masks and ONNX initializers: which initializers are weights, reading them, and
writing masked ones back.

The ONNX side of ``graphprune.sparsify``: :func:`weight_uses` lists, in node order, every
initializer a ``MatMul`` (input 1, ``(K, N)``: reduction axis 0), ``Gemm`` (input B, ``(K, N)``,
or ``(N, K)`` with ``transB=1``: axis 1) or ``Conv`` (input W, ``(O, C/g, kh, kw)``: axis 1)
reads as its weight; :func:`initializer_arrays` reads them lazily; the sparsity pass
(``graphprune.passes.sparsity.weight_arrays``) computes masks from them; the API records the
masks on the IR and :func:`apply_masks` writes the masked initializers into a copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.ir.errors import ConfigError

__all__ = ["apply_masks", "initializer_arrays", "weight_uses"]


def weight_uses(model: onnx.ModelProto) -> list[tuple[str, str, str, int]]:
    """``(initializer, node name, op type, reduction axis)`` for each weight use, in node order."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        name = node.name or node.output[0]
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "MatMul":
            out.append((node.input[1], name, "MatMul", 0))
        elif node.op_type == "Gemm":
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            out.append((node.input[1], name, "Gemm", 1 if trans_b else 0))
        elif node.op_type == "Conv":
            out.append((node.input[1], name, "Conv", 1))
    return out


class _Initializers(Mapping):
    """Initializer name -> numpy array, converted on access."""

    def __init__(self, model: onnx.ModelProto):
        self._protos = {i.name: i for i in model.graph.initializer}

    def __getitem__(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._protos[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


def initializer_arrays(model: onnx.ModelProto) -> Mapping[str, np.ndarray]:
    """The model's initializers by name, each read into numpy only when looked up."""
    return _Initializers(model)


def apply_masks(model: onnx.ModelProto, masks: Mapping[str, Any],
                inplace: bool = False) -> onnx.ModelProto:
    """``model`` with each masked initializer zeroed outside its mask (a copy unless ``inplace``).

    ``masks``: initializer name -> bool array (numpy or torch) of its shape, True = kept. Every
    name and shape is checked before anything is written.

    Examples
    --------
    >>> from onnx import helper, TensorProto
    >>> w = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    >>> out = apply_masks(helper.make_model(g), {"W": np.eye(2, dtype=bool)})
    >>> numpy_helper.to_array(out.graph.initializer[0]).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    out = model
    if not inplace:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    missing = [k for k in masks if k not in inits]
    if missing:
        raise ConfigError(f"masks name initializers the model does not have: {missing[:3]}")
    keeps = {k: np.asarray(m.numpy() if hasattr(m, "numpy") else m, dtype=bool)
             for k, m in masks.items()}
    for k, keep in keeps.items():
        if tuple(inits[k].dims) != keep.shape:
            raise ConfigError(f"mask of {k!r} has shape {keep.shape}, the initializer "
                              f"{tuple(inits[k].dims)}")
    for k, keep in keeps.items():
        w = numpy_helper.to_array(inits[k])
        inits[k].CopyFrom(numpy_helper.from_array((w * keep).astype(w.dtype), k))
    return out
