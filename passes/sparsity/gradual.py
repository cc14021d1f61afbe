"""Keeping masks applied while fine-tuning, and gradual (iterative / AGP) sparsification.

``keep_masks(model, masks, optimizer=None)`` holds masked weights at exact zero during training:
gradients of masked entries are zeroed (grad hooks), the weights are re-masked before every
forward (module pre-hooks), and, given an optimizer, right after every ``optimizer.step()``
(post-step hook), so momentum or weight decay cannot revive them.

``sparsify_gradually`` runs ``steps`` rounds of :func:`sparsify`; round ``t`` targets

- AGP (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f) (1 - t/n)^3``,
- linear ("iterative"): ``s_t = s_i + (s_f - s_i) t/n``,

and calls the user's ``fine_tune(model, masks, step)`` with the masks kept applied. Masks only
grow: weights pruned in one round stay pruned in the next.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from graphprune.ir.errors import ConfigError

from graphprune.passes.sparsity.sparsify import SparsifyResult, sparsify
from graphprune.passes.sparsity.patterns import NM, parse_pattern

__all__ = ["MaskKeeper", "keep_masks", "schedule_sparsity", "sparsify_gradually"]


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

    Examples
    --------
    >>> import torch
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


def schedule_sparsity(step: int, steps: int, final: float, initial: float = 0.0,
                      kind: str = "agp") -> float:
    """Target sparsity after round ``step`` of ``steps`` (1-based)."""
    frac = min(max(step / steps, 0.0), 1.0)
    if kind == "agp":
        return final + (initial - final) * (1.0 - frac) ** 3
    if kind == "linear":
        return initial + (final - initial) * frac
    raise ConfigError(f"schedule={kind!r}: use 'agp' or 'linear'")


def sparsify_gradually(model: nn.Module, sparsity: float, steps: int, fine_tune=None,
                       initial_sparsity: float = 0.0, schedule: str = "agp",
                       inplace: bool = False, **kwargs) -> SparsifyResult:
    """Sparsify in ``steps`` rounds, fine-tuning between rounds with masks kept applied.

    ``fine_tune(model, masks, step)`` trains ``model`` in place (create its optimizer inside and
    wrap it with :func:`keep_masks` for exact zeros after every step; forward passes are masked
    already). ``kwargs`` go to :func:`sparsify` (method, pattern, calib, scope, ...); ``calib``
    may be a callable ``calib(model) -> batches`` to recalibrate on the current model.
    Returns the last round's result, with ``report.notes`` listing each round's sparsity.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps={steps!r} must be a positive int")
    if isinstance(parse_pattern(kwargs.get("pattern", "unstructured")), NM):
        raise ConfigError("N:M fixes the sparsity; a gradual schedule needs 'unstructured' or "
                          "'block:RxC' (prune N:M once, then fine-tune under keep_masks)")
    if not (isinstance(sparsity, (int, float)) and 0 <= initial_sparsity <= sparsity < 1):
        raise ConfigError(f"need 0 <= initial_sparsity ({initial_sparsity}) <= sparsity "
                          f"({sparsity}) < 1")
    if fine_tune is not None and not callable(fine_tune):
        raise ConfigError("fine_tune must be callable(model, masks, step)")
    schedule_sparsity(1, steps, sparsity, initial_sparsity, schedule)  # validates schedule
    work = model if inplace else copy.deepcopy(model)
    calib = kwargs.pop("calib", None)
    masks, res, notes = None, None, []
    for t in range(1, steps + 1):
        s_t = schedule_sparsity(t, steps, sparsity, initial_sparsity, schedule)
        c = calib(work) if callable(calib) else calib
        res = sparsify(work, sparsity=s_t, calib=c, inplace=True, prior_masks=masks, **kwargs)
        masks = res.masks
        notes.append(f"round {t}/{steps}: target {s_t:.4f}, got {res.report.total_sparsity:.4f}")
        if fine_tune is not None:
            with keep_masks(work, masks):
                fine_tune(work, masks, t)
    res.report.notes.extend(notes)
    return SparsifyResult(work, masks, res.report)
