"""Load and run compiled artifacts (see :mod:`graphprune.codegen.artifact` for the layout).

Needs only ``tvm`` and ``numpy``: torch tensors are accepted as inputs by duck typing, torch is
never imported. :func:`load` verifies the manifest's own digest and the sha256 of every file
before handing anything to TVM, so a tampered or truncated artifact is refused with an
:class:`~graphprune.ir.errors.ArtifactError` instead of crashing in the loader.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from graphprune.ir.errors import ArtifactError

__all__ = ["Artifact", "load"]

FORMAT = "graphprune-artifact"  # codegen.artifact writes these, this module checks them
FORMAT_VERSION = 1
_SUPPORTED_VERSIONS = (FORMAT_VERSION,)
_DLPACK_CPU = 1  # DLPack's kDLCPU
# Prefix of the messages of the bounds checks codegen compiles into the module
# (graphprune.codegen.index_checks imports it from here: the loader must not import codegen).
INDEX_CHECK_PREFIX = "graphprune index check"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (the writer, ``codegen.artifact``, uses this too)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, ``self_sha256`` left out."""
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class Artifact:
    """A compiled model on disk, ready to run: ``art(*inputs) -> numpy`` output(s).

    Use :func:`load` (or ``graphprune.codegen.compile``) to get one.

    Attributes
    ----------
    path : pathlib.Path
        The artifact directory.
    manifest : dict
        The parsed ``manifest.json`` (versions, target, io specs, kernels, hashes).

    Examples
    --------
    >>> art = load("build/resnet_pruned")            # doctest: +SKIP
    >>> y = art(np.zeros(art.manifest["inputs"][0]["shape"], "float32"))  # doctest: +SKIP

    An input's ``shape`` in the manifest holds ints for static axes and a dim's name for
    dynamic ones (``["batch", 3, 224, 224]``); ``manifest["dynamic_dims"]`` gives each name's
    ``[min, max]``. Inputs are checked against both before the call (:class:`ArtifactError`).
    """

    def __init__(self, path: Path, manifest: dict):
        import tvm
        from tvm import relax

        self.path = Path(path)
        self.manifest = manifest
        kind = manifest.get("target", {}).get("kind", "llvm")
        self._device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(self.path / manifest["library"]))
            self._vm = relax.VirtualMachine(lib, self._device)
            with np.load(self.path / manifest["weights"], allow_pickle=False) as w:
                self._weights = [
                    tvm.runtime.tensor(w[name], self._device) for name in manifest["weight_names"]
                ]
        except ArtifactError:
            raise
        except Exception as e:  # TVM / numpy raise their own types for corrupt files
            raise ArtifactError(f"cannot load artifact {self.path}: {e}") from e
        self._main = self._vm[manifest.get("entry", "main")]
        # One VM runs one call at a time (its registers are shared): calls take this lock.
        self._lock = threading.Lock()
        self._buffers: list = [None] * len(manifest["inputs"])

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    def _check(self, arrays: list[np.ndarray]) -> None:
        """Count, dtype, rank and every axis against the manifest (a dynamic axis within its
        ``dynamic_dims`` range and equal wherever the same dim appears), then the values of
        index inputs (``index_inputs``) against their range: an :class:`ArtifactError` naming
        the input, axis and what is allowed, before anything reaches TVM."""
        specs = self.inputs
        if len(arrays) != len(specs):
            names = ", ".join(s["name"] for s in specs)
            raise ArtifactError(f"expected {len(specs)} input(s) ({names}), got {len(arrays)}")
        dims = self.manifest.get("dynamic_dims", {})
        bound: dict[str, tuple[int, str, int]] = {}  # dim -> (value, input, axis) first seen
        for a, s in zip(arrays, specs):
            name, want = s["name"], tuple(s["shape"])
            shown = tuple(want)
            if str(a.dtype) != s["dtype"]:
                raise ArtifactError(
                    f"input {name!r}: expected dtype {s['dtype']}, got dtype {a.dtype} "
                    f"(shape {tuple(a.shape)}); cast it, e.g. x.astype({s['dtype']!r})"
                )
            if a.ndim != len(want):
                raise ArtifactError(
                    f"input {name!r}: expected rank {len(want)} {shown}, got shape "
                    f"{tuple(a.shape)} (rank {a.ndim})"
                )
            for axis, (got, dim) in enumerate(zip(a.shape, want)):
                if isinstance(dim, int):
                    if got != dim:
                        raise ArtifactError(
                            f"input {name!r}, axis {axis}: expected {dim}, got {got} (expected "
                            f"shape {shown}, got shape {tuple(a.shape)}); "
                            + ("this axis is static in the artifact" if dims else
                               "the artifact was compiled for static shapes, recompile with "
                               "matching example_inputs or with dynamic_shapes")
                        )
                    continue
                if dim not in dims:
                    continue  # a derived extent (2 * seq): the VM checks it
                lo, hi = dims[dim]
                if got < lo or (hi is not None and got > hi):
                    allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                    raise ArtifactError(
                        f"input {name!r}, axis {axis} (dynamic dim {dim!r}): {got} is outside "
                        f"the compiled range {allowed} (got shape {tuple(a.shape)}); recompile "
                        f"with a wider range in dynamic_shapes"
                    )
                if dim in bound and bound[dim][0] != got:
                    v, other, ax = bound[dim]
                    raise ArtifactError(
                        f"input {name!r}, axis {axis} (dynamic dim {dim!r}) is {got}, but input "
                        f"{other!r} axis {ax} gave {dim!r} = {v}: they must be equal"
                    )
                bound.setdefault(dim, (got, name, axis))
        by_name = {s["name"]: a for a, s in zip(arrays, specs)}
        for rec in self.manifest.get("index_inputs", []):
            a = by_name.get(rec["input"]) if rec.get("direct") else None
            if a is None or a.size == 0:
                continue
            lo, hi = rec["range"]
            bad = (a < lo) | (a >= hi)
            if bad.any():
                pos = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ArtifactError(
                    f"input {rec['input']!r}: index {a[pos]} at position {pos} is outside "
                    f"[{lo}, {hi}) (it indexes {rec.get('indexes') or 'a tensor'} on axis "
                    f"{rec.get('axis', 0)}); token ids must be in range"
                )

    def _device_input(self, i: int, a: np.ndarray):
        """Input ``i`` as a TVM tensor: the array itself (DLPack, no copy) when it is on the CPU,
        C-contiguous and 64-byte aligned as TVM's kernels assume (torch tensors and their numpy
        views are); otherwise a copy into a buffer allocated on the first call, not a fresh
        tensor (allocation and page faults) on every call."""
        import tvm

        if self._device.dlpack_device_type() == _DLPACK_CPU and a.flags.c_contiguous and (
                a.ctypes.data % 64 == 0):  # fmt: skip
            try:
                return tvm.runtime.from_dlpack(a)
            except (BufferError, TypeError, ValueError):  # read-only arrays cannot be exported
                pass
        buf = self._buffers[i]
        if buf is None or tuple(buf.shape) != a.shape:  # dynamic dims: a new shape
            buf = self._buffers[i] = tvm.runtime.empty(a.shape, str(a.dtype), self._device)
        try:  # into a numpy view of the buffer: ~90 us faster than Tensor.copyfrom per call
            np.copyto(np.from_dlpack(buf), a)
        except (BufferError, TypeError, ValueError, RuntimeError):  # not host memory
            buf.copyfrom(np.ascontiguousarray(a))
        return buf

    def __call__(self, *inputs):
        """Run the model; returns one array, or a tuple when the model has several outputs.

        Safe to call from several threads: calls run one at a time (the TVM VM behind an
        artifact is not reentrant; concurrent calls crashed the process before).
        """
        arrays = [_to_numpy(x) for x in inputs]
        self._check(arrays)
        with self._lock:
            args = [self._device_input(i, a) for i, a in enumerate(arrays)]
            try:
                result = self._main(*args, *self._weights)
            except RuntimeError as e:  # the index checks compiled into the module
                if INDEX_CHECK_PREFIX not in str(e):
                    raise
                raise ArtifactError(str(e).strip().splitlines()[-1]) from e
            outs = [_host_copy(o) for o in _flatten(result)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s['name']}{tuple(s['shape'])}:{s['dtype']}" for s in self.inputs)
        return f"Artifact({str(self.path)!r}, target={self.manifest['target'].get('kind')}, {ins})"


def _host_copy(t) -> np.ndarray:
    """A numpy copy of TVM tensor ``t``: through DLPack where numpy can take it (a CPU tensor of
    a numpy dtype), else ``Tensor.numpy()``, which costs ~40-100 us more per call (a tenth of a
    small CNN's latency)."""
    try:
        return np.from_dlpack(t).copy()
    except (BufferError, TypeError, ValueError, RuntimeError):
        return t.numpy()


def _flatten(result):
    if hasattr(result, "numpy"):
        return [result]
    out = []
    for item in result:
        out.extend(_flatten(item))
    return out


def load(path) -> Artifact:
    """Open an artifact directory written by ``graphprune.codegen.compile``.

    Raises
    ------
    ArtifactError
        When the directory, manifest or a listed file is missing, the manifest was edited, a file
        does not match its sha256 (tampered or truncated), or the format is unknown.

    Examples
    --------
    >>> import graphprune.runtime as rt
    >>> art = rt.load("build/resnet_pruned")   # doctest: +SKIP
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an artifact: {manifest_path.name} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is unreadable or truncated: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not a graphprune artifact manifest")
    if manifest.get("format_version") not in _SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{manifest_path}: format_version {manifest.get('format_version')} is not supported "
            f"by this graphprune (supports {_SUPPORTED_VERSIONS}); recompile the model"
        )
    if manifest.get("self_sha256") != manifest_digest(manifest):
        raise ArtifactError(
            f"{manifest_path} was modified after it was written (its digest does not match); "
            f"recompile the model instead of editing the manifest"
        )
    files = manifest.get("files", {})
    for key in ("library", "weights"):
        if manifest.get(key) not in files:
            raise ArtifactError(f"{manifest_path}: {key} file is not covered by a hash")
    for name, expected in files.items():
        f = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{manifest_path}: file name {name!r} leaves the artifact")
        if not f.is_file():
            raise ArtifactError(f"artifact {path} is incomplete: {name} is missing")
        actual = file_sha256(f)
        if actual != expected:
            raise ArtifactError(
                f"artifact {path}: {name} is corrupt, truncated or tampered with "
                f"(sha256 {actual[:16]}… != {expected[:16]}… in the manifest)"
            )
    return Artifact(path, manifest)
