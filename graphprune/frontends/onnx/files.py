"""ONNX files: loading (external data included), saving atomically, and models over protobuf's 2 GB.

A model whose weights exceed protobuf's 2 GB limit cannot be serialised as one message: it is
stored as a small ``.onnx`` file plus *external data* (the tensors' bytes in files beside it,
``onnx.save(..., save_as_external_data=True)``). In memory such a model is an ordinary
``ModelProto`` once its external data is loaded, but everything that serialises it fails past
2 GB: ``onnx.checker.check_model`` and ``onnx.shape_inference.infer_shapes`` on the message,
``InferenceSession(model.SerializeToString())``. :func:`on_disk` gives onnxruntime a path
instead (the model written with external data into a temporary folder), the route the onnx
documentation gives for large models. The checker and shape inference run on the model's
:func:`skeleton` (its large tensors replaced by references to data that does not exist), which
is small at any size and spares the serialised copies of the weights they would make.

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

import numpy as np
import onnx
from onnx import external_data_helper, helper

from graphprune.ir.errors import ArtifactError, CaptureError
from graphprune.staging import make_staging_dir

__all__ = ["annotate_shapes", "check_model", "infer_shapes", "is_large", "load_onnx", "on_disk",
           "save_onnx", "skeleton"]

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


#: the external-data location of a skeleton's tensors (:func:`skeleton`): no such data exists
PLACEHOLDER = "graphprune-weights-not-loaded"


def tensor_nbytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize if t.data_type != 8 else 0


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def skeleton(model: onnx.ModelProto, limit: int = INLINE_BYTES) -> onnx.ModelProto:
    """``model`` without the bytes of its initializers over ``limit``: each becomes a reference
    to external data at :data:`PLACEHOLDER` (same name, type and dims), the rest is copied.

    Shape inference and the checker read a tensor's type and dims, and the values of small
    integer tensors only, so they give the same answers on a skeleton for a fraction of the
    memory: ``infer_shapes`` and ``check_model`` on a ``ModelProto`` serialise it, and the C++
    side parses the bytes again (three copies of the weights at once). Reading a placeholder's
    values fails (no such file), so nothing can silently use a skeleton's missing weights.
    """
    skel = onnx.ModelProto()
    _copy_fields(model, skel, "graph")
    _copy_fields(model.graph, skel.graph, "initializer")
    for t in model.graph.initializer:
        if tensor_nbytes(t) <= limit:
            skel.graph.initializer.add().CopyFrom(t)
            continue
        stub = skel.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", PLACEHOLDER
    return skel


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on the model's :func:`skeleton`, through a path (the checker
    wants the placeholder data file to exist beside the model: an empty one is written)."""
    tmp = tempfile.mkdtemp(prefix="graphprune_onnx_")
    try:
        path = os.path.join(tmp, "model.onnx")
        open(os.path.join(tmp, PLACEHOLDER), "wb").close()
        onnx.save_model(skeleton(model), path)
        onnx.checker.check_model(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def infer_shapes(model: onnx.ModelProto, strict_mode: bool = False) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (with data propagation) of the model's
    :func:`skeleton`: the returned model has the inferred ``value_info`` and outputs, and
    placeholders for its large tensors (:func:`annotate_shapes` puts the shapes on a model)."""
    return onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=strict_mode,
                                             data_prop=True)  # fmt: skip


def annotate_shapes(model: onnx.ModelProto) -> None:
    """Write the inferred shapes of ``model``'s tensors into ``model`` itself (its
    ``value_info`` and outputs): shape inference without a copy of the weights."""
    inferred = infer_shapes(model)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
