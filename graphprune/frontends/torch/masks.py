"""Sparsity masks written into a torch model: once (:func:`apply_masks`) or held through training
(:func:`keep_masks`).

The write-back step of ``graphprune.sparsify`` for torch models: the sparsity pass computes masks
(``graphprune.passes.sparsity``), the API records them on the IR (``PruneGraph.masks``) and calls
:func:`apply_masks`. Masks are keyed by parameter name (``named_parameters``, tied names
included), bool, in the parameter's shape, True = kept; torch tensors or numpy arrays.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.ir.errors import ConfigError

__all__ = ["MaskKeeper", "apply_masks", "keep_masks"]


def _as_bool_tensor(m: Any) -> torch.Tensor:
    return m.bool() if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m, bool))


def _resolve(model: nn.Module, masks: Mapping[str, Any]) -> list[tuple[str, nn.Parameter]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in masks if k not in params]
    if missing:
        raise ConfigError(f"masks name parameters the model does not have: {missing[:3]}")
    for k, m in masks.items():
        if tuple(params[k].shape) != tuple(m.shape):
            raise ConfigError(f"mask of {k!r} has shape {tuple(m.shape)}, the parameter "
                              f"{tuple(params[k].shape)}")
    return [(k, params[k]) for k in masks]


def apply_masks(model: nn.Module, masks: Mapping[str, Any], inplace: bool = False,
                values: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """``model`` with every masked weight zeroed outside its mask, on a deep copy unless
    ``inplace``.

    ``values`` (optional, by parameter name) replaces a weight before masking: the weights a
    reconstruction method (SparseGPT) computed. Every name and shape is checked before anything is
    written, so a ``ConfigError`` leaves ``model`` as it was.

    Examples
    --------
    >>> lin = torch.nn.Linear(4, 2)
    >>> out = apply_masks(lin, {"weight": torch.eye(2, 4, dtype=torch.bool)})
    >>> int((out.weight != 0).sum()), out is lin, int((lin.weight != 0).sum())
    (2, False, 8)
    """
    out = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, p in _resolve(out, masks):
            keep = _as_bool_tensor(masks[name]).to(p.device)
            if values is not None and name in values:
                p.copy_(values[name].to(p.device, p.dtype))
            p.mul_(keep.to(p.dtype))
    return out


class MaskKeeper:
    """Handle returned by :func:`keep_masks`; a context manager; ``remove()`` detaches hooks."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], optimizer=None):
        params = dict(model.named_parameters())
        missing = [k for k in masks if k not in params]
        if missing:
            raise ConfigError(f"masks name parameters the model does not have: {missing[:3]}")
        self.pairs = [(params[k], m.to(params[k].device)) for k, m in masks.items()]
        for p, m in self.pairs:
            if p.shape != m.shape:
                raise ConfigError(f"mask shape {tuple(m.shape)} != parameter shape "
                                  f"{tuple(p.shape)}")
        self.handles = [p.register_hook(lambda g, m=m: g * m) for p, m in self.pairs
                        if p.requires_grad]
        owners = {}
        for name, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full in masks:
                    owners.setdefault(id(mod), (mod, []))[1].append((p, masks[full]))
        for mod, pm in owners.values():
            self.handles.append(mod.register_forward_pre_hook(
                lambda mod, args, pm=pm: self._apply(pm)))
        if optimizer is not None:
            self.handles.append(optimizer.register_step_post_hook(lambda *a: self.apply()))
        self.apply()

    @staticmethod
    def _apply(pairs) -> None:
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m.to(p.dtype))

    def apply(self) -> None:
        """Zero every masked weight now."""
        self._apply(self.pairs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> MaskKeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.apply()
        self.remove()


def keep_masks(model: nn.Module, masks: dict[str, torch.Tensor], optimizer=None) -> MaskKeeper:
    """Keep ``masks`` (``{param_name: bool}``) applied to ``model`` while it trains.

    Gradients of masked entries are zeroed (grad hooks), the weights are re-masked before every
    forward (module pre-hooks) and, given an optimizer, right after every ``optimizer.step()``
    (post-step hook), so momentum or weight decay cannot revive them.

    Examples
    --------
    >>> lin = torch.nn.Linear(4, 4)
    >>> masks = {"weight": torch.rand(4, 4) > 0.5}
    >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    >>> with keep_masks(lin, masks, opt):
    ...     for _ in range(3):
    ...         opt.zero_grad(); lin(torch.randn(2, 4)).sum().backward(); opt.step()
    >>> bool((lin.weight[~masks["weight"]] == 0).all())
    True
    """
    return MaskKeeper(model, masks, optimizer)
