"""ONNX files: loading (external data included), saving atomically, and models over protobuf's 2 GB.

A model whose weights exceed protobuf's 2 GB limit cannot be serialised as one message: it is
stored as a small ``.onnx`` file plus *external data* (the tensors' bytes in files beside it,
``onnx.save(..., save_as_external_data=True)``). In memory such a model is an ordinary
``ModelProto`` once its external data is loaded, but everything that serialises it fails past
2 GB: ``onnx.checker.check_model`` and ``onnx.shape_inference.infer_shapes`` on the message,
``InferenceSession(model.SerializeToString())``. :func:`on_disk` gives those callers a path
instead (the model written with external data into a temporary folder), the route the onnx
documentation gives for large models (``check_model(path)``, ``infer_shapes_path``).

Used by capture (load, check, infer), the shape folding and the onnxruntime sessions; the API
and the CLI write models with :func:`save_onnx`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import onnx
from onnx import external_data_helper

from graphprune.ir.errors import ArtifactError, CaptureError
from graphprune.staging import make_staging_dir

__all__ = ["check_model", "infer_shapes", "is_large", "load_onnx", "on_disk", "save_onnx"]

#: protobuf refuses to serialise a message of 2 GB or more; keep a margin for the graph itself
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF - (64 << 20)

#: tensors up to this size stay in the .onnx file when saving with external data (onnx's own
#: default): shape inference propagates the values of small integer constants only when inline
INLINE_BYTES = 1024


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held in the model's initializers (and ``Constant`` nodes' tensors)."""
    total = sum(len(t.raw_data) or _typed_bytes(t) for t in model.graph.initializer)
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += len(a.t.raw_data) or _typed_bytes(a.t)
    return total


def _typed_bytes(t: onnx.TensorProto) -> int:
    # Tensors stored in typed fields (float_data, int64_data, ...): 4 or 8 bytes an element.
    return 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (
        len(t.int64_data) + len(t.double_data) + len(t.uint64_data))


def is_large(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """Whether ``model`` is too large to serialise as one protobuf message (``limit`` bytes of
    tensors, default :data:`PROTOBUF_LIMIT`)."""
    return tensor_bytes(model) >= (PROTOBUF_LIMIT if limit is None else limit)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs):
                yield from _tensors(g)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _tensors(model.graph) if external_data_helper.uses_external_data(t)]


def load_onnx(model_or_path: Any) -> tuple[onnx.ModelProto, str]:
    """``(model, name)`` from a ``ModelProto`` or a ``.onnx`` path, external data loaded from the
    files beside it. A :class:`CaptureError` says what is missing or unreadable."""
    if isinstance(model_or_path, onnx.ModelProto):
        missing = [t.name for t in _external_tensors(model_or_path)]
        if missing:
            raise CaptureError(
                f"the ONNX model's tensors {missing[:3]} are external data that was not loaded "
                "(onnx.load(..., load_external_data=False)): pass the .onnx path, or load it "
                "with its data (onnx.load(path))."
            )
        return model_or_path, model_or_path.graph.name or "onnx_model"
    path = os.fspath(model_or_path)
    if not os.path.exists(path):
        raise CaptureError(f"ONNX file {path!r} does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
        raise CaptureError(
            f"{path!r} is not a readable ONNX model ({type(e).__name__}: {e}); the file may be "
            "truncated or corrupt: export it again."
        ) from e
    base = os.path.dirname(os.path.abspath(path))
    for t in _external_tensors(model):
        info = external_data_helper.ExternalDataInfo(t)
        where = os.path.join(base, info.location)
        if not os.path.exists(where):
            raise CaptureError(
                f"{path!r} keeps tensor {t.name!r} in external data file {info.location!r}, "
                f"which is not beside it ({where} does not exist): copy the data file(s) "
                "next to the .onnx file."
            )
    try:
        external_data_helper.load_external_data_for_model(model, base)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"the external data of {path!r} cannot be read: {e}") from e
    return model, os.path.splitext(os.path.basename(path))[0]


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike,
              external_data: bool | None = None) -> list[str]:  # fmt: skip
    """Write ``model`` to ``path`` atomically; returns the files written.

    ``external_data`` (default: only when the model is too large for one protobuf message)
    stores every tensor over :data:`INLINE_BYTES` in ``<name>.data`` beside ``path``. Both
    files are built in a hidden folder beside ``path`` and renamed into place, the data first,
    so a reader never sees a ``.onnx`` without its data. ``model`` itself is not modified.
    """
    path = os.path.abspath(os.fspath(path))
    external = is_large(model) if external_data is None else bool(external_data)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    data_name = f"{name}.data"
    tmp = str(make_staging_dir(path))  # also removes what interrupted writes left beside it
    try:
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # convert_model_to_external_data edits the message it is given
            onnx.save_model(copy, os.path.join(tmp, name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=INLINE_BYTES)
            del copy
            os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
        else:
            onnx.save_model(model, os.path.join(tmp, name))
        os.replace(os.path.join(tmp, name), path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"could not write the ONNX model to {path}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [path, os.path.join(folder, data_name)] if external else [path]


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto) -> Iterator[str]:
    """A path to ``model`` written with external data in a temporary folder (removed on exit),
    for the tools that take a path where a large model cannot be serialised."""
    tmp = tempfile.mkdtemp(prefix="graphprune_onnx_")
    try:
        path = os.path.join(tmp, "model.onnx")
        save_onnx(model, path, external_data=True)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model``, through a path for a model past protobuf's 2 GB."""
    if not is_large(model):
        onnx.checker.check_model(model)
        return
    with on_disk(model) as path:
        onnx.checker.check_model(path)


def infer_shapes(model: onnx.ModelProto, strict_mode: bool = False) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (with data propagation), through
    ``infer_shapes_path`` for a model past protobuf's 2 GB."""
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, strict_mode=strict_mode, data_prop=True)
    with on_disk(model) as path:
        out = os.path.join(os.path.dirname(path), "inferred.onnx")
        onnx.shape_inference.infer_shapes_path(path, out, strict_mode=strict_mode,
                                               data_prop=True)  # fmt: skip
        return onnx.load(out)  # with the external data file beside it
