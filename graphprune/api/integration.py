"""Use graphprune inside an existing export script.

``prune_exported`` takes the :class:`torch.export.ExportedProgram` such a script already has,
prunes the module it describes with :func:`graphprune.prune` and exports the result again, so the
rest of the script (``torch.export.save``, AOTInductor, ``torch.onnx.export`` of the module, ...)
keeps working on a smaller model. Runs after ``torch.export.export`` and before whatever consumed
its program; the program given is not modified.
"""

from __future__ import annotations

from typing import Any

from graphprune.ir.errors import CaptureError, ConfigError

__all__ = ["prune_exported"]


def prune_exported(ep: Any, example_inputs: Any = None, **prune_kwargs: Any) -> Any:
    """Prune an ``ExportedProgram`` and return a new ``ExportedProgram`` of the pruned model.

    Parameters
    ----------
    ep : torch.export.ExportedProgram
    example_inputs : tuple of tensors, optional
        Defaults to the program's own example inputs (``ep.example_inputs``); positional only.
    **prune_kwargs
        Passed to :func:`graphprune.prune` (``ratio``, ``criterion``, ``scope``, ...).

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = (torch.randn(2, 8),)
    >>> ep = gp.prune_exported(torch.export.export(m, x), ratio=0.5)
    >>> ep.module()(*x).shape
    torch.Size([2, 2])
    """
    import torch

    from graphprune.api.structured import prune

    if not isinstance(ep, torch.export.ExportedProgram):
        raise ConfigError(f"prune_exported wants a torch.export.ExportedProgram, got "
                          f"{type(ep).__name__}; for an nn.Module call gp.prune")  # fmt: skip
    if example_inputs is None:
        args, kwargs = getattr(ep, "example_inputs", None) or ((), {})
        if kwargs:
            raise ConfigError("the program was exported with keyword inputs: pass "
                              "example_inputs= as a positional tuple")  # fmt: skip
        example_inputs = args
    example_inputs = tuple(example_inputs)
    if not example_inputs:
        raise ConfigError("the program carries no example inputs: pass example_inputs=")
    res = prune(ep.module(), example_inputs, **prune_kwargs)
    try:
        return torch.export.export(res.model, example_inputs)
    except Exception as e:  # torch.export raises many types; the message says what it met
        raise CaptureError(f"re-exporting the pruned model failed ({res.report.form} form): "
                           f"{type(e).__name__}: {e}") from e
