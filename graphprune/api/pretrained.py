"""``graphprune.from_pretrained``: reload a pruned ``transformers`` model whose per-layer widths
its config cannot express (written by ``PruneResult.save_pretrained``).

A result the config does express is saved with the model's own ``save_pretrained`` and needs no
graphprune to reload; this entry point is for the rest: safetensors weights, the original config
and ``graphprune_plan.json`` (shapes and size attributes per module). No pickle.
"""

from __future__ import annotations

import os
from typing import Any


def from_pretrained(path: str | os.PathLike) -> Any:
    """Rebuild the pruned model saved in ``path``.

    Examples
    --------
    >>> res = gp.prune(model, (ids,), uniform=False)  # doctest: +SKIP
    >>> res.save_pretrained("out")  # doctest: +SKIP
    >>> model = graphprune.from_pretrained("out")  # doctest: +SKIP
    """
    from graphprune.frontends.torch.hf import load_pruned

    return load_pruned(path)


__all__ = ["from_pretrained"]
