"""onnxruntime sessions for ONNX models: the one place that creates them.

Used wherever an ONNX model has to be run on the CPU: the pipeline's verify step and latency
benchmark, and the ONNX oracle. Every session runs on ``CPUExecutionProvider``. Two settings
differ between callers and are arguments: ``threads`` (the oracle pins one thread) and
``optimize`` (the oracle turns graph optimisations off, so the dead and the pruned model run the
same unfused kernels and their difference is the pruning's alone).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphprune.frontends.onnx.files import is_large, on_disk

__all__ = ["feeds_for", "ort_session", "run_onnx"]


def ort_session(model_or_path: Any, threads: int | None = None, optimize: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU.

    Parameters
    ----------
    model_or_path : onnx.ModelProto, bytes or path
        The model (serialised for onnxruntime) or the path of a ``.onnx`` file.
    threads : int, optional
        ``intra_op_num_threads``; default onnxruntime's own choice.
    optimize : bool
        ``False`` sets ``ORT_DISABLE_ALL`` (no fusion, no constant folding); default onnxruntime's
        optimisation level.

    Examples
    --------
    >>> import onnx
    >>> from onnx import TensorProto, helper
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    >>> [i.name for i in ort_session(m, threads=1).get_inputs()]
    ['x']
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        so.intra_op_num_threads = threads
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
    elif isinstance(model_or_path, bytes):
        source = model_or_path
    elif is_large(model_or_path):
        # Past protobuf's 2 GB the model cannot be serialised: onnxruntime reads it from a path
        # with external data (it has read or mapped the data once the session exists).
        with on_disk(model_or_path) as path:
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    else:
        source = model_or_path.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def feeds_for(sess: Any, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
    """The session's feed dict: a mapping keeps the names the model takes (extra entries, such as
    a captured graph's other inputs, are left out); a sequence is matched to inputs by position."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, Mapping):
        wanted = set(names)
        return {k: np.asarray(v) for k, v in inputs.items() if k in wanted}
    return {n: np.asarray(x) for n, x in zip(names, inputs)}


def run_onnx(model: Any, feeds: Mapping[str, Any] | Sequence[Any], threads: int | None = None,
             optimize: bool = True) -> list[np.ndarray]:  # fmt: skip
    """Run ``model`` once on ``feeds`` (by name, or positional) and return its outputs.

    ``threads`` and ``optimize`` are :func:`ort_session`'s.
    """
    sess = ort_session(model, threads=threads, optimize=optimize)
    return list(sess.run(None, feeds_for(sess, feeds)))
