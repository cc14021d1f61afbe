"""Frontends: turn a source model into the IR and apply the passes' results back to it.

One subpackage per source format (``torch``, ``onnx``). Each captures a model into a
:class:`~graphprune.ir.PruneGraph` and attaches a source object (``PruneGraph.source``, see
:class:`graphprune.ir.source.Source`) that runs the captured model, maps its nodes to IR values
and writes removal plans back. Only this layer looks at what type a model is: everything above
asks :func:`kind_of`. Imports the IR layer only.
"""

from __future__ import annotations

import os
from typing import Any

from graphprune.ir import PruneGraph
from graphprune.ir.dim_roles import annotate_dim_roles
from graphprune.ir.errors import CaptureError


def kind_of(model: Any) -> str:
    """``"onnx"`` for an ``onnx.ModelProto`` or a path to a ``.onnx`` file, ``"torch"`` for an
    ``nn.Module``; a :class:`CaptureError` saying what to pass for anything else."""
    if isinstance(model, (str, os.PathLike)):
        return "onnx"
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        return "onnx"
    import torch

    if isinstance(model, torch.nn.Module):
        return "torch"
    raise CaptureError(
        f"cannot capture an object of type {type(model).__name__}: pass a torch.nn.Module "
        "with example_inputs, an onnx.ModelProto, or the path of a .onnx file."
    )


def capture(model: Any, example_inputs: Any = None, name: str | None = None,
            dynamic_shapes: Any = None) -> PruneGraph:  # fmt: skip
    """Capture ``model`` with the frontend :func:`kind_of` picks (see :func:`graphprune.capture`).
    ``dynamic_shapes``: ONNX ``{dim_param: (min, max)}``; torch, torch.export's own format."""
    if kind_of(model) == "onnx":
        from graphprune.frontends.onnx.capture import capture_onnx

        pg = capture_onnx(os.fspath(model) if isinstance(model, os.PathLike) else model, name=name,
                          example_inputs=example_inputs, dynamic_shapes=dynamic_shapes)
    else:
        from graphprune.frontends.torch.capture import capture_torch

        pg = capture_torch(model, example_inputs, name=name, dynamic_shapes=dynamic_shapes)
    annotate_dim_roles(pg)
    return pg


__all__ = ["capture", "kind_of"]
