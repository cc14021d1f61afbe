"""Sparsity masks from the IR onto the lowered model's weights, for the sparse rewrite.

Runs in :func:`graphprune.codegen.compiler.compile` after :mod:`.lower` and before
:mod:`.sparse_rewrite`, when ``compile`` is given a graph (``graph=``, or a result carrying
``.graph``) whose :attr:`~graphprune.ir.PruneGraph.masks` is non-empty. The sparse rewrite then
takes each layer's sparsity pattern from its mask instead of from the zeros of its weight
(``"masks": "graph"`` in the manifest; ``"detected"`` otherwise).

``PruneGraph.masks`` is keyed by the source model's parameter names (torch state-dict names,
ONNX initializer names): the names :mod:`.lower` records in ``LoweredModel.param_names``. A tied
weight (``PruneGraph.aliases``) may be lowered as several parameters, one per name; its mask
applies to each of them.

Checks, each a :class:`~graphprune.ir.errors.ConfigError` naming the parameter: the mask names
no weight of the model, its shape differs from the weight's, or the weight has nonzeros outside
it. The last means the model is not the one the masks were computed for, or it was trained after
masking without re-applying them; compiling it either way would change what it computes.
Then the masks are applied (weights zeroed outside them, on copies) before compression.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from graphprune.codegen.lower import LoweredModel
from graphprune.ir.errors import ConfigError

__all__ = ["apply_masks"]


def apply_masks(
    lowered: LoweredModel, masks: dict[str, np.ndarray], aliases: dict | None = None
) -> tuple[LoweredModel, dict[str, np.ndarray]]:
    """Check ``masks`` against the weights of ``lowered`` and zero each weight outside its mask.

    Parameters
    ----------
    lowered : LoweredModel
        From :func:`graphprune.codegen.lower.lower` (``param_names`` filled in); not modified.
    masks : dict of str to bool ndarray
        Parameter name -> keep-mask of the weight's shape (True = kept), as in
        ``PruneGraph.masks``.
    aliases : dict of str to tuple of str, optional
        Other names of the same tensor (``PruneGraph.aliases``).

    Returns
    -------
    (LoweredModel, dict)
        The model with masked weights, and ``{name in lowered.param_names: bool mask}`` for
        :func:`graphprune.codegen.sparse_rewrite.rewrite_sparse`.

    Examples
    --------
    >>> import torch
    >>> from graphprune.codegen.lower import lower
    >>> lin = torch.nn.Linear(4, 2)
    >>> keep = np.eye(2, 4, dtype=bool)
    >>> with torch.no_grad():
    ...     _ = lin.weight.mul_(torch.from_numpy(keep))
    >>> lowered = lower(lin, (torch.randn(3, 4),))
    >>> lowered.param_names
    ['weight', 'bias']
    >>> masked, by_param = apply_masks(lowered, {"weight": keep})
    >>> sorted(by_param), int(np.count_nonzero(masked.params[0]))
    (['weight'], 2)
    >>> apply_masks(lowered, {"weight": np.zeros((2, 4), bool)})
    Traceback (most recent call last):
    ...
    graphprune.ir.errors.ConfigError: sparsity mask of 'weight' does not match the model: ...
    """
    where: dict[str, list[int]] = {}
    for i, name in enumerate(lowered.param_names):
        where.setdefault(name, []).append(i)
    params = list(lowered.params)
    by_param: dict[str, np.ndarray] = {}
    for key, mask in masks.items():
        names = (key, *(aliases or {}).get(key, ()))
        hits = [i for n in names for i in where.get(n, [])]
        if not hits:
            raise ConfigError(
                f"sparsity mask of {key!r} names no weight of the model being compiled "
                f"(weights: {sorted(where)[:5]}...): is the graph a capture of this model?"
            )
        mask = np.asarray(mask, dtype=bool)
        for i in hits:
            name, w = lowered.param_names[i], params[i]
            if mask.shape != w.shape:
                raise ConfigError(
                    f"sparsity mask of {key!r} has shape {mask.shape} but the weight "
                    f"{name!r} has {w.shape}: masks must be computed on the model compiled"
                )
            outside = int(np.count_nonzero(w[~mask]))
            if outside:
                raise ConfigError(
                    f"sparsity mask of {name!r} does not match the model: the weight has "
                    f"{outside} nonzeros where the mask prunes. Compile the model the masks "
                    f"were computed for (e.g. the sparsify result's .model), or re-apply the "
                    f"masks after training"
                )
            params[i] = np.where(mask, w, np.zeros((), w.dtype))
            by_param[name] = mask
    return replace(lowered, params=params), by_param
