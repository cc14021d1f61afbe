"""What the CLI's commands share: one-line user errors, and ``--shape`` / ``--dynamic``.

Every user error of every command (:mod:`.cli`, :mod:`.cli_compile`) is one line on stderr,
``graphprune[ CMD]: error: ...``, and exit code 2: :func:`user_error` for ours,
:class:`OneLineParser` for ``argparse``'s usage errors (which otherwise print the usage too).

``--shape NAME=D0,D1,...`` and ``--dynamic DIM=MIN,MAX`` are for ONNX models.
An ONNX file exported with dynamic axes has symbolic input dims (``dim_param``). ``--shape``
fixes the example inputs the model is analysed, calibrated and checked at (one per input, by
name); ``--dynamic`` gives a symbolic dim's range, the API's ``dynamic_shapes={dim: (min, max)}``
(default ``(1, 64)``), within which the pruned model keeps the dim symbolic. Inputs ``--shape``
does not name take their static dims, and for a symbolic dim the size another ``--shape`` gave
the same ``dim_param``, else 2 clipped to its range (what the API picks without inputs).
Used by ``prune``, ``inspect``, ``sparsify`` (:mod:`.cli`) and, ``--shape`` only, ``compile``
(:mod:`.cli_compile`, which builds a static artifact at that shape).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from graphprune.ir.errors import ConfigError

__all__ = ["OneLineParser", "onnx_example_inputs", "parse_range", "parse_shape", "user_error"]

OUTPUT_NOTE = ("Outputs: an existing output is replaced only with --force; missing parent "
               "directories are created (and reported on stderr); a path that cannot be written "
               "is refused before any work. User errors exit with code 2 and one line on "
               "stderr.")  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one line (and exit code 2), like ours."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def user_error(message: str) -> int:
    """Print a user error as one line on stderr; return the exit code, 2."""
    print(f"graphprune: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2

SHAPE_HELP = ("example shape of an ONNX input with dynamic dims, NAME=D0,D1,... (repeatable); "
              "the model is analysed and checked at it")  # fmt: skip
DYNAMIC_HELP = ("range of a symbolic ONNX dim, DIM=MIN,MAX (repeatable; default 1,64): the "
                "pruned model keeps it symbolic within the range")  # fmt: skip


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` → ``("x", (1, 3, 224, 224))`` (an ``argparse`` type)."""
    name, _, dims = text.rpartition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=D0,D1,..., got {text!r}")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: dims must be integers") from e
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: dims must be >= 1")
    return name, shape


def parse_range(text: str) -> tuple[str, tuple[int, int]]:
    """``"batch=1,64"`` → ``("batch", (1, 64))`` (an ``argparse`` type)."""
    name, _, rng = text.rpartition("=")
    parts = rng.split(",")
    if not name or len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--dynamic wants DIM=MIN,MAX, got {text!r}")
    try:
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--dynamic {text!r}: MIN and MAX are integers") from e
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--dynamic {text!r}: need 1 <= MIN <= MAX")
    return name, (lo, hi)


def _inputs(proto: Any) -> list[tuple[str, list[int | str | None], np.dtype]]:
    """``(name, dims, dtype)`` of the graph inputs that are not initializers; a dim is an int,
    its ``dim_param`` or ``None`` (unnamed symbolic)."""
    from onnx import helper

    inits = {t.name for t in proto.graph.initializer}
    out = []
    for i in proto.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim]  # fmt: skip
        out.append((i.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return out


def onnx_example_inputs(proto: Any, shapes: dict[str, tuple[int, ...]],
                        ranges: dict[str, tuple[int, int]] | None = None,
                        seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """One example array per input of ``proto`` (by name) at the ``--shape`` sizes.

    Floats are standard normal (seeded), integers and bools zeros (a valid token id / index).
    A ``--shape`` that names no input, has another rank or contradicts a static dim, or a size
    outside its ``--dynamic`` range, is a :class:`ConfigError` naming it.
    """
    ranges = ranges or {}
    inputs = _inputs(proto)
    names = [n for n, _, _ in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ConfigError(f"--shape names {unknown}, which are not inputs of the model; its "
                          f"inputs are {names}")  # fmt: skip
    sizes: dict[str, int] = {}
    for name, dims, _ in inputs:
        if name not in shapes:
            continue
        given = shapes[name]
        if len(given) != len(dims):
            raise ConfigError(f"--shape {name}={','.join(map(str, given))}: the input has rank "
                              f"{len(dims)} (dims {dims})")  # fmt: skip
        for axis, (d, g) in enumerate(zip(dims, given)):
            if isinstance(d, int) and d != g:
                raise ConfigError(f"--shape {name}: axis {axis} is fixed at {d} in the model, "
                                  f"got {g}")  # fmt: skip
            if isinstance(d, str):
                if sizes.setdefault(d, g) != g:
                    raise ConfigError(f"--shape gives dim {d!r} two sizes, {sizes[d]} and {g}")
                lo, hi = ranges.get(d, (1, g))  # the API checks its default range itself
                if not lo <= g <= hi:
                    raise ConfigError(f"--shape {name}: dim {d!r} = {g} is outside its "
                                      f"--dynamic range {lo},{hi}")  # fmt: skip
    rng = np.random.default_rng(seed)
    out = {}
    for name, dims, dtype in inputs:
        shape = shapes.get(name) or tuple(
            d if isinstance(d, int) else sizes.get(d) or min(max(ranges.get(d, (1, 64))[0], 2),
                                                             ranges.get(d, (1, 64))[1])
            for d in dims)  # fmt: skip
        if dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[name] = np.zeros(shape, dtype)
    return out
