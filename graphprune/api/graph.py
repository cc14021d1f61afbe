"""Public entry points: :func:`capture` and :func:`explain`."""

from __future__ import annotations

import os
from typing import Any

from graphprune.ir.errors import CaptureError
from graphprune.ir import PruneGraph
from graphprune.passes.coupling import build_coupling


def capture(model_or_onnx: Any, example_inputs: Any = None, name: str | None = None) -> PruneGraph:
    """Capture a model into a :class:`PruneGraph`.

    Parameters
    ----------
    model_or_onnx : torch.nn.Module, onnx.ModelProto, str or os.PathLike
        A PyTorch module (captured with ``torch.export``, falling back to ``torch.fx``), an ONNX
        model, or the path of a ``.onnx`` file.
    example_inputs : tuple of tensors, optional
        Required for torch modules; use a batch size >= 2. Ignored for ONNX.

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> pg = gp.capture(torch.nn.Conv2d(3, 8, 3), (torch.randn(2, 3, 8, 8),))
    >>> pg.capture_method
    'torch.export'
    """
    if isinstance(model_or_onnx, (str, os.PathLike)):
        from graphprune.frontends.onnx.capture import capture_onnx

        return _annotated(capture_onnx(os.fspath(model_or_onnx), name=name))
    try:
        import onnx

        if isinstance(model_or_onnx, onnx.ModelProto):
            from graphprune.frontends.onnx.capture import capture_onnx

            return _annotated(capture_onnx(model_or_onnx, name=name))
    except ImportError:  # pragma: no cover - onnx is a hard dependency
        pass
    import torch

    if isinstance(model_or_onnx, torch.nn.Module):
        from graphprune.frontends.torch.capture import capture_torch

        return _annotated(capture_torch(model_or_onnx, example_inputs, name=name))
    raise CaptureError(
        f"cannot capture an object of type {type(model_or_onnx).__name__}: pass a torch.nn.Module "
        "with example_inputs, an onnx.ModelProto, or the path of a .onnx file."
    )


# Dimension roles of parameters, by the op kind that reads them and the slot they sit in.
_ROLES = {
    ("conv", 1): ("out_channels", "in_channels_per_group", "kernel", "kernel", "kernel"),
    ("conv", 2): ("out_channels",),
    ("conv_transpose", 1): ("in_channels", "out_channels_per_group", "kernel", "kernel", "kernel"),
    ("conv_transpose", 2): ("out_channels",),
    ("embedding", 0): ("vocabulary", "features"),
    ("batch_norm", 1): ("channels",), ("batch_norm", 2): ("channels",),
    ("batch_norm", 3): ("channels",), ("batch_norm", 4): ("channels",),
    ("group_norm", 2): ("channels",), ("group_norm", 3): ("channels",),
}


def _annotated(pg: PruneGraph) -> PruneGraph:
    annotate_dim_roles(pg)
    return pg


def annotate_dim_roles(pg: PruneGraph) -> None:
    """Name each parameter dimension after the first op that reads it (``Value.dim_roles``)."""
    for o in pg.ops():
        op = pg.op(o)
        for slot, v in enumerate(pg.op_inputs(o)):
            if v is None or pg.value(v).role != "param" or pg.value(v).dim_roles:
                continue
            rank = len(pg.value(v).shape or ())
            roles = _ROLES.get((op.kind, slot))
            if op.kind == "linear":
                xs, ws, bs = op.attrs.get("slots", (0, 1, 2))
                oi = op.attrs.get("w_layout", "oi") == "oi"
                if slot == ws:
                    roles = ("out_features", "in_features") if oi else ("in_features", "out_features")
                elif slot == bs:
                    roles = ("out_features",)
            elif op.kind in ("layer_norm", "instance_norm") and slot > 0:
                roles = ("features",) * rank
            if roles is None:
                roles = ("data",) * rank
            pg.value(v).dim_roles = tuple(roles[:rank]) + ("data",) * max(0, rank - len(roles))


def explain(pg: PruneGraph, file: Any = None, limit: int | None = None) -> str:
    """Print (and return) a table of ``pg``'s coupled groups.

    Columns: group id, size (indices), granularity (positions per index in the first parameter),
    members, and whether it is prunable, approximate (statistics over it change) or frozen.
    """
    groups = build_coupling(pg).groups
    rows = [("id", "size", "gran", "status", "members / reason")]
    for g in groups[:limit] if limit else groups:
        if g.frozen_reason:
            status, detail = "frozen", f"{g.describe()}  <- {g.frozen_reason}"
        elif not g.exact:
            status, detail = "approx", f"{g.describe()}  ({g.reductions[0]})"
        else:
            status, detail = "prunable", g.describe()
        rows.append((str(g.id), str(g.size), str(g.granularity), status, detail))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [pg.summary()]
    lines += ["  ".join(r[i].ljust(w[i]) for i in range(4)) + "  " + r[4] for r in rows]
    n_p = sum(1 for g in groups if g.prunable)
    lines.append(f"{len(groups)} groups: {n_p} prunable, {len(groups) - n_p} frozen")
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file)
    return text
