"""Public entry points: :func:`capture` and :func:`explain`."""

from __future__ import annotations

from typing import Any

from graphprune import frontends
from graphprune.ir import PruneGraph
from graphprune.passes.coupling import build_coupling


def capture(model_or_onnx: Any, example_inputs: Any = None, name: str | None = None,
            dynamic_shapes: Any = None) -> PruneGraph:  # fmt: skip
    """Capture a model into a :class:`PruneGraph`.

    Parameters
    ----------
    model_or_onnx : torch.nn.Module, onnx.ModelProto, str or os.PathLike
        A PyTorch module (captured with ``torch.export``, falling back to ``torch.fx``), an ONNX
        model, or the path of a ``.onnx`` file.
    example_inputs : tuple of tensors, optional
        Required for torch modules; use a batch size >= 2. For ONNX (optional): the sizes the
        model's symbolic dims are analysed at (by input name or position).
    dynamic_shapes : dict or tuple, optional
        Torch: ``torch.export``'s own format, a ``torch.export.Dim`` (with ``min``/``max``) per
        input axis, e.g. ``{"x": {0: Dim("batch", min=1, max=64)}}``. Default: the batch axis
        of every input (``Dim("batch", min=1, max=1024)``) and, for integer inputs (token ids,
        attention masks), the sequence axis up to the model's maximum positions; where the
        model fixes such an axis it falls back to static (``pg.static_axes`` says why);
        ``False``: every axis static, at the example sizes.
        ``pg.dynamic_axes`` lists what stayed dynamic; ``Value.symbols`` names each value's
        symbolic sizes. ONNX: ``{dim_param: (min, max)}`` for the model's symbolic input dims
        (default ``(1, 64)`` each); the pruned model keeps them symbolic and is checked at both
        ends.

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> pg = gp.capture(torch.nn.Conv2d(3, 8, 3), (torch.randn(2, 3, 8, 8),))
    >>> pg.capture_method
    'torch.export'
    >>> [a.describe() for a in pg.dynamic_axes]
    ['input[0] = batch in [1, 1024]']
    """
    return frontends.capture(model_or_onnx, example_inputs, name=name,
                             dynamic_shapes=dynamic_shapes)


def groups(pg: PruneGraph) -> list:
    """Coupled channel groups of ``pg``, prunable ones first (``group.frozen_reason`` says why a
    group is not); see :func:`graphprune.passes.coupling.build_coupling`.

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> [g.size for g in gp.groups(gp.capture(m, (torch.randn(2, 4),))) if g.prunable]
    [8]
    """
    return build_coupling(pg).groups


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
