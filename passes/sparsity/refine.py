"""Training-free refinements around the per-layer criteria: OWL allocation and DSnoT masks.

- ``owl_sparsities`` (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", ICML): layers
  (transformer blocks) with more activation outliers get lower sparsity. A block's outlier ratio
  is the fraction of its Wanda scores ``|W_ij| ||X_j||`` above ``m`` times their mean; ratios are
  mapped linearly onto ``[s - lam, s + lam]`` and shifted so the parameter-weighted mean sparsity
  stays exactly ``s``. Defaults ``m=5, lam=0.08`` are the paper's LLaMA settings.
- ``dsnot_refine`` (Zhang et al. 2024, "Dynamic Sparse No Training", ICLR): starting from a
  row-wise mask, swap one pruned and one kept weight per output row per cycle so the row's
  expected output shift ``sum_{j pruned} W_ij E[X_j]`` moves towards zero. Regrowth favours
  pruned weights whose contribution ``W_ij E[X_j] / Var[X_j]`` has the shift's sign; pruning
  takes the lowest-Wanda-score kept weight whose contribution has the opposite sign. A row stops
  when its shift is below ``threshold`` or a swap would flip its sign; at most ``cycles`` swaps.
  Counts per row never change. Defaults (50 cycles, threshold 0.1, variance power 1) are the
  paper's.

Both run in the plan step of :mod:`graphprune.passes.sparsity.sparsify` (they only need
calibration statistics from :mod:`graphprune.passes.sparsity.calibration`), before the masks are
returned.
"""

from __future__ import annotations

import torch

__all__ = ["outlier_ratio", "owl_sparsities", "dsnot_refine"]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (one block's Wanda scores) above ``m`` x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float,
                   lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: more outliers, denser; weighted mean = sparsity.

    Examples
    --------
    >>> [round(s, 3) for s in owl_sparsities([0.01, 0.02, 0.03], [10, 10, 10], 0.5, 0.08)]
    [0.58, 0.5, 0.42]
    """
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [sparsity] * len(ratios)
    dens = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    total = sum(sizes)
    shift = (1.0 - sparsity) - sum(d * n for d, n in zip(dens, sizes)) / total
    return [min(1.0, max(0.0, 1.0 - (d + shift))) for d in dens]


def dsnot_refine(w2d: torch.Tensor, keep: torch.Tensor, wanda: torch.Tensor, mean: torch.Tensor,
                 var: torch.Tensor, cycles: int = 50, threshold: float = 0.1,
                 var_power: float = 1.0) -> torch.Tensor:
    """Refine a row-wise keep-mask by DSnoT swaps; returns a new mask with the same row counts."""
    W = w2d.float()
    rows, cols = W.shape
    contrib = W * mean.float().unsqueeze(0)  # W_ij E[X_j]: expected contribution to output i
    pruned = ~keep
    err = (contrib * pruned).sum(1)  # expected output shift caused by the pruned weights
    sign0 = torch.sign(err)
    big = torch.finfo(torch.float32).max
    # Regrowth candidates (pruned), ascending by variance-normalised contribution: read from the
    # end when err > 0 (largest positive contribution first), from the start when err < 0.
    grow_key = contrib / var.float().clamp_min(1e-12).pow(var_power).unsqueeze(0)
    grow_order = torch.sort(torch.where(pruned, grow_key, torch.full_like(W, big)), 1).indices
    n_pruned = pruned.sum(1)
    # Pruning candidates (kept) in Wanda order, split by the sign of their contribution.
    wkey = torch.where(keep, wanda.float(), torch.full_like(W, big))
    neg_order = torch.sort(torch.where(keep & (contrib < 0), wkey, torch.full_like(W, big)),
                           1).indices
    pos_order = torch.sort(torch.where(keep & (contrib >= 0), wkey, torch.full_like(W, big)),
                           1).indices
    n_neg = (keep & (contrib < 0)).sum(1)
    n_pos = (keep & (contrib >= 0)).sum(1)
    g_lo = torch.zeros(rows, dtype=torch.long)
    g_hi = n_pruned - 1
    p_neg = torch.zeros(rows, dtype=torch.long)
    p_pos = torch.zeros(rows, dtype=torch.long)
    active = (err.abs() > threshold) & (n_pruned > 0)
    new_keep = keep.clone()
    r = torch.arange(rows)
    for _ in range(cycles):
        if not bool(active.any()):
            break
        up = err > 0
        gi = torch.where(up, g_hi, g_lo).clamp(0, cols - 1)
        grow = grow_order[r, gi]
        # err > 0: prune a negative contributor (pruning adds its contribution to err).
        pi = torch.where(up, p_neg, p_pos).clamp(0, cols - 1)
        prune = torch.where(up, neg_order[r, pi], pos_order[r, pi])
        have = (g_lo <= g_hi) & torch.where(up, p_neg < n_neg, p_pos < n_pos)
        after = err - contrib[r, grow] + contrib[r, prune]
        ok = active & have & (torch.sign(after) == sign0)
        new_keep[r[ok], grow[ok]] = True
        new_keep[r[ok], prune[ok]] = False
        err = torch.where(ok, after, err)
        g_hi = g_hi - (ok & up).long()
        g_lo = g_lo + (ok & ~up).long()
        p_neg = p_neg + (ok & up).long()
        p_pos = p_pos + (ok & ~up).long()
        active = ok & (err.abs() > threshold)
    return new_keep
