"""Gradual (iterative / AGP) sparsification: the sparsity each round targets.

``graphprune.api.sparsify.sparsify_gradually`` runs ``steps`` rounds of the sparsity pass, writing
each round's masks into the model and fine-tuning between rounds (masks held by
``graphprune.frontends.torch.masks.keep_masks``). Round ``t`` of ``n`` targets

- AGP (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f) (1 - t/n)^3``,
- linear ("iterative"): ``s_t = s_i + (s_f - s_i) t/n``.

Masks only grow: each round passes the previous masks as ``prior_masks``, so weights pruned in
one round stay pruned in the next.
"""

from __future__ import annotations

from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.patterns import NM, parse_pattern

__all__ = ["schedule_sparsity", "validate_schedule"]


def schedule_sparsity(step: int, steps: int, final: float, initial: float = 0.0,
                      kind: str = "agp") -> float:
    """Target sparsity after round ``step`` of ``steps`` (1-based).

    Examples
    --------
    >>> round(schedule_sparsity(1, 2, 0.8), 3), schedule_sparsity(2, 2, 0.8)
    (0.7, 0.8)
    """
    frac = min(max(step / steps, 0.0), 1.0)
    if kind == "agp":
        return final + (initial - final) * (1.0 - frac) ** 3
    if kind == "linear":
        return initial + (final - initial) * frac
    raise ConfigError(f"schedule={kind!r}: use 'agp' or 'linear'")


def validate_schedule(sparsity, steps, initial_sparsity=0.0, schedule="agp",
                      pattern="unstructured", fine_tune=None) -> None:
    """ConfigError for a gradual schedule that cannot run (N:M, bad steps, ratios, schedule)."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps={steps!r} must be a positive int")
    if isinstance(parse_pattern(pattern), NM):
        raise ConfigError("N:M fixes the sparsity; a gradual schedule needs 'unstructured' or "
                          "'block:RxC' (prune N:M once, then fine-tune under keep_masks)")
    if not (isinstance(sparsity, (int, float)) and 0 <= initial_sparsity <= sparsity < 1):
        raise ConfigError(f"need 0 <= initial_sparsity ({initial_sparsity}) <= sparsity "
                          f"({sparsity}) < 1")
    if fine_tune is not None and not callable(fine_tune):
        raise ConfigError("fine_tune must be callable(model, masks, step)")
    schedule_sparsity(1, steps, sparsity, initial_sparsity, schedule)  # validates schedule
