"""What a torch model returned, as a flat list of tensors.

A forward may return a tensor, a (nested) tuple or list, a dict, or a ``transformers``
``ModelOutput`` (an ``OrderedDict`` subclass). Every place that compares or checks model outputs
(module-form write-back, the oracle, the pipeline's verify step, calibration losses) flattens them
the same way, here, so they agree on order and on what counts as an output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["flatten_outputs"]


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors in ``out``, depth first, in order (dicts in insertion order).

    Non-tensor leaves (``None``, ints, strings) are dropped: they are not outputs a compiled
    model or a pruned graph reproduces.

    Examples
    --------
    >>> a, b = torch.zeros(1), torch.ones(2)
    >>> [t.shape for t in flatten_outputs((a, {"x": b, "n": None}, [a]))]
    [torch.Size([1]), torch.Size([2]), torch.Size([1])]
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in flatten_outputs(o)]
    return []
