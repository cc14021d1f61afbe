"""Activation observation on a torch model: forward pre-hooks on the target layers feed each
calibration batch's layer inputs, as 2-D rows, to :class:`ActObserver` objects.

Rows are those of :meth:`graphprune.passes.sparsity.targets.Target.inputs2d` (im2col for convs);
for dict batches with a 2-D ``attention_mask`` (Hugging Face tokenizers' output) padding tokens
are left out, as in the sparsity calibration (:mod:`graphprune.passes.sparsity.calibration`):
their activations are artefacts of padding and would widen the observed range. Hooks are removed
when the batches are done, also on error.
"""

from __future__ import annotations

import torch
from graphprune.passes.quant.observers import ActObserver
from graphprune.passes.sparsity.calibration import token_mask
from graphprune.passes.sparsity.targets import Target, call_model
from torch import nn


def observe_torch(model: nn.Module, targets: list[Target],
                  calib: list) -> dict[str, ActObserver]:  # fmt: skip
    """Observers of each target's input over ``calib`` (keyed by module name)."""
    obs = {t.name: ActObserver(t.name) for t in targets}
    current: list[torch.Tensor | None] = [None]

    def hook_for(t: Target):
        def hook(mod, args):
            x = args[0].detach()
            m = current[0]
            if m is not None and x.dim() >= 3 and x.shape[:2] == m.shape:
                x = x[m]
            obs[t.name].add(t.inputs2d(x).float().cpu().numpy())

        return hook

    hooks = [t.module.register_forward_pre_hook(hook_for(t)) for t in targets]
    try:
        with torch.no_grad():
            for b in calib:
                current[0] = token_mask(b)
                call_model(model, b)
    finally:
        for h in hooks:
            h.remove()
    return obs
