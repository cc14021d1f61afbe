"""Sparsity patterns: parsing ``"unstructured" | "N:M" | "block:RxC"`` and turning scores into masks.

Every weight is seen as a 2-D matrix ``(out, reduction)``: a Linear's ``(out_features,
in_features)``, a Conv's ``(out_channels, in_channels/groups * kh * kw)`` in PyTorch's flatten
order. Patterns are defined on that view, which is what the sparse and N:M kernels consume.

Masks are boolean, ``True`` = kept. Selection is by exact counts (a ``kthvalue`` threshold, redone
with ``topk`` when ties make it inexact), so ties cannot change how many weights a group keeps:
unstructured selection prunes exactly ``round(sparsity * size)`` entries of its comparison group,
N:M keeps exactly N of every M, and a block is kept or dropped as a whole.

Runs in the plan step of the sparsity pipeline: the criteria
(:mod:`graphprune.passes.sparsity.methods`) produce scores, this module picks the mask, and the
passes (:mod:`graphprune.passes.sparsity.sparsify`, :mod:`graphprune.passes.sparsity.weight_arrays`)
return it; the frontends write it back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from graphprune.ir.errors import ConfigError

__all__ = [
    "Unstructured",
    "NM",
    "Block",
    "Pattern",
    "parse_pattern",
    "prune_count",
    "select_mask",
    "select_global",
    "check_mask",
]


@dataclass(frozen=True)
class Unstructured:
    """Any entry may be pruned; the comparison group is the layer, a row, or all layers."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """Keep exactly ``n`` of every ``m`` consecutive weights along the reduction dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Tiles of ``rows x cols`` (output x reduction) are kept or pruned as a whole."""

    rows: int
    cols: int

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}"


Pattern = Unstructured | NM | Block

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*:\s*(\d+)\s*x\s*(\d+)\s*$", re.IGNORECASE)


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse a pattern string.

    Examples
    --------
    >>> parse_pattern("2:4"), parse_pattern("block:4x1"), parse_pattern("unstructured")
    (NM(n=2, m=4), Block(rows=4, cols=1), Unstructured())
    """
    if isinstance(text, (Unstructured, NM, Block)):
        return text
    if not isinstance(text, str):
        raise ConfigError(
            f"pattern={text!r}: expected a string 'unstructured', 'N:M' (e.g. '2:4') "
            "or 'block:RxC' (e.g. 'block:4x4')"
        )
    if text.strip().lower() == "unstructured":
        return Unstructured()
    if m := _NM_RE.match(text):
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ConfigError(
                f"pattern={text!r}: N:M needs 0 < N < M (N weights kept out of every M); "
                "use e.g. '2:4' or '4:8'"
            )
        return NM(n, mm)
    if m := _BLOCK_RE.match(text):
        r, c = int(m.group(1)), int(m.group(2))
        if r < 1 or c < 1:
            raise ConfigError(f"pattern={text!r}: block sides must be >= 1, e.g. 'block:1x4'")
        return Block(r, c)
    raise ConfigError(
        f"pattern={text!r} does not parse: use 'unstructured', 'N:M' with N < M (e.g. '2:4', "
        "'4:8') or 'block:RxC' (e.g. 'block:1x4', 'block:4x4', 'block:16x1')"
    )


def prune_count(sparsity: float, size: int) -> int:
    """Number of entries to prune from a group of ``size``: ``round(sparsity * size)``, half up."""
    return min(size, int(math.floor(sparsity * size + 0.5)))


def fits(pattern: Pattern, shape2d: tuple[int, int]) -> str | None:
    """Why ``pattern`` cannot tile a ``(out, reduction)`` matrix, or ``None`` when it can."""
    out, red = shape2d
    if isinstance(pattern, NM) and red % pattern.m:
        return f"reduction dim {red} is not divisible by M={pattern.m}"
    if isinstance(pattern, Block) and (out % pattern.rows or red % pattern.cols):
        return f"shape {out}x{red} is not divisible by block {pattern.rows}x{pattern.cols}"
    return None


def _block_scores(scores: torch.Tensor, pat: Block) -> torch.Tensor:
    out, red = scores.shape
    return scores.reshape(out // pat.rows, pat.rows, red // pat.cols, pat.cols).sum(dim=(1, 3))


def _expand_blocks(keep: torch.Tensor, pat: Block) -> torch.Tensor:
    return keep.repeat_interleave(pat.rows, 0).repeat_interleave(pat.cols, 1)


def _keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep all but the ``n_prune`` lowest entries along the last dim (exact counts).

    ``kthvalue`` finds each group's threshold about 2-3x faster than a ``topk`` of half the
    group; when ties at the threshold would prune more than ``n_prune`` in some group, that
    selection is redone with ``topk`` so counts stay exact.
    """
    size = scores.shape[-1]
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune >= size:
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = torch.kthvalue(scores, n_prune, dim=-1, keepdim=True).values
    keep = scores > thr
    if bool((keep.sum(-1) != size - n_prune).any()):
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(scores, n_prune, dim=-1, largest=False).indices, False)
    return keep


def select_mask(
    scores: torch.Tensor, pattern: Pattern, sparsity: float, group: str = "layer"
) -> torch.Tensor:
    """Mask keeping the highest-scoring entries of a 2-D ``(out, reduction)`` score matrix.

    ``group`` is the comparison group for unstructured selection: ``"layer"`` prunes exactly
    ``round(sparsity * numel)``, ``"row"`` exactly ``round(sparsity * reduction)`` per output row
    (Wanda's choice). N:M ignores ``sparsity`` (it is ``1 - N/M``); blocks are ranked by the sum
    of their scores, layer-wide.
    """
    if not scores.is_floating_point():
        scores = scores.float()
    if isinstance(pattern, NM):
        out, red = scores.shape
        g = scores.reshape(out, red // pattern.m, pattern.m)
        return _keep_top(g, pattern.m - pattern.n).reshape(out, red)
    if isinstance(pattern, Block):
        b = _block_scores(scores, pattern)
        keep = _keep_top(b.reshape(-1), prune_count(sparsity, b.numel())).reshape(b.shape)
        return _expand_blocks(keep, pattern)
    if group == "row":
        return _keep_top(scores, prune_count(sparsity, scores.shape[1]))
    flat = _keep_top(scores.reshape(-1), prune_count(sparsity, scores.numel()))
    return flat.reshape(scores.shape)


def select_global(
    scores: dict[str, torch.Tensor], pattern: Pattern, sparsity: float, min_keep: float
) -> dict[str, torch.Tensor]:
    """One ranking across layers: exactly ``round(sparsity * total)`` units pruned overall.

    Each layer first reserves its best ``ceil(min_keep * units)`` units (so no layer collapses,
    the failure mode SynFlow describes); the rest of the keep budget goes to the globally
    highest-scoring remaining units. Units are weights, or blocks for a block pattern.
    """
    if isinstance(pattern, NM):
        raise ConfigError("scope='global' has no meaning for N:M (every group keeps exactly N)")
    dtype = torch.promote_types(torch.float32, next(iter(scores.values())).dtype)
    units = {k: s.to(dtype) for k, s in scores.items()}
    if isinstance(pattern, Block):
        units = {k: _block_scores(u, pattern) for k, u in units.items()}
    total = sum(u.numel() for u in units.values())
    budget = total - prune_count(sparsity, total)
    reserved = {k: min(u.numel(), math.ceil(min_keep * u.numel())) for k, u in units.items()}
    if sum(reserved.values()) > budget:
        raise ConfigError(
            f"min_keep={min_keep} reserves {sum(reserved.values())} units but sparsity={sparsity} "
            f"keeps only {budget} of {total}: lower min_keep or sparsity"
        )
    flat, keep_flat = [], []
    for k, u in units.items():
        f = u.reshape(-1)
        keep = torch.zeros_like(f, dtype=torch.bool)
        if reserved[k]:
            keep[torch.topk(f, reserved[k]).indices] = True
        keep_flat.append(keep)
        flat.append(torch.where(keep, torch.full_like(f, -math.inf), f))
    allf, allk = torch.cat(flat), torch.cat(keep_flat)
    extra = budget - int(allk.sum())
    if extra > 0:
        # Reserved entries carry -inf, so topk over the rest never picks them twice.
        cand = torch.nonzero(~allk).squeeze(1)
        pick = cand[torch.topk(allf[cand], extra).indices]
        allk[pick] = True
    out, start = {}, 0
    for k, u in units.items():
        keep = allk[start : start + u.numel()].reshape(u.shape)
        start += u.numel()
        out[k] = _expand_blocks(keep, pattern) if isinstance(pattern, Block) else keep
    return out


def check_mask(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Does a 2-D ``(out, reduction)`` keep-mask have ``pattern``? (Unstructured: always.)"""
    if isinstance(pattern, NM):
        out, red = mask.shape
        if red % pattern.m:
            return False
        return bool((mask.reshape(out, -1, pattern.m).sum(-1) <= pattern.n).all())
    if isinstance(pattern, Block):
        out, red = mask.shape
        if out % pattern.rows or red % pattern.cols:
            return False
        t = mask.reshape(out // pattern.rows, pattern.rows, red // pattern.cols, pattern.cols)
        s = t.sum(dim=(1, 3))
        return bool(((s == 0) | (s == pattern.rows * pattern.cols)).all())
    return True
