"""PruneChannels (planning): which indices of which groups to remove.

Inputs: the coupling groups, a criterion's per-index scores and a :class:`PruneConfig`
(ratio or a MACs/params target, per-layer overrides, ignore globs, ``round_to``, ``min_keep``,
local or global scope). Output: ``{group id: indices}`` for :func:`plan_removal`. Nothing is
written back here. Runs after ``BuildCoupling``, before ``PlanRemoval``; :class:`PruneChannels` is
the pass, :func:`run` the same as a function.

Scopes: *local* removes ``ratio`` of every group; *global* ranks every index of every group by
its score normalised by the group's mean score and removes the lowest ``ratio`` of all indices,
never taking a group below ``min_keep`` (protection against layer collapse).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from graphprune.passes import cost as cost_model
from graphprune.passes.base import PassResult
from graphprune.passes.coupling import Group, build_coupling
from graphprune.passes.prune import criteria
from graphprune.passes.prune.plan import plan_removal

from graphprune.ir import PruneGraph
from graphprune.ir.checks import check_integer, check_number
from graphprune.ir.errors import ConfigError


def check_ranges(*, ratio: Any = None, target_macs: Any = None, target_params: Any = None,
                 min_keep: Any = 0.1, round_to: Any = None,
                 ratios: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Types and ranges of the planning options; ``None`` means not given. Shared by
    :meth:`PruneConfig.validate` and ``gp.prune``'s up-front checks (before any capture)."""
    check_number("ratio", ratio, 0.0, 1.0, none_ok=True)
    check_number("target_macs", target_macs, 0.0, 1.0, lo_open=True, hi_open=False, none_ok=True)
    check_number("target_params", target_params, 0.0, 1.0, lo_open=True, hi_open=False,
                 none_ok=True)  # fmt: skip
    check_number("min_keep", min_keep, 0.0, 1.0, hi_open=False, example="0.1")
    check_integer("round_to", round_to, 1, example=8, none_ok=True)
    for pat, r in (ratios or {}).items():
        if not isinstance(pat, str):
            raise ConfigError(f"ratios key {pat!r} is not a name glob (a string)")
        check_number(f"ratios[{pat!r}]", r, 0.0, 1.0, example="0.3")


@dataclass
class PruneConfig:
    ratio: float = 0.5
    criterion: str | Callable = "l2"
    scope: str = "local"
    target_macs: float | None = None
    target_params: float | None = None
    ratios: dict[str, float] | None = None
    ignore: list[str] | None = None
    round_to: int | None = None
    min_keep: float = 0.1
    heads: bool = True
    calib: Any = None
    loss_fn: Callable | None = None
    seed: int = 0
    uniform: bool = False
    exclude: dict[int, str] | None = None

    def validate(self) -> None:
        check_ranges(ratio=self.ratio, target_macs=self.target_macs,
                     target_params=self.target_params, min_keep=self.min_keep,
                     round_to=self.round_to, ratios=self.ratios)  # fmt: skip
        if self.target_macs is not None and self.target_params is not None:
            raise ConfigError("give target_macs or target_params, not both")
        if self.scope not in ("local", "global"):
            raise ConfigError(f"scope={self.scope!r}: use 'local' or 'global'")
        if isinstance(self.criterion, str):
            criteria.get(self.criterion)
            if self.criterion in criteria.NEEDS_CALIB and self.calib is None:
                raise ConfigError(f"criterion {self.criterion!r} needs calibration data: pass "
                                  "calib=[batch, ...] (tuples of input tensors)")  # fmt: skip


@dataclass
class Selection:
    removal: dict[int, list[int]]
    scores: dict[int, np.ndarray]
    excluded: dict[int, str] = field(default_factory=dict)
    ratio_used: float = 0.0
    notes: list[str] = field(default_factory=list)


def _matches(pattern: str, name: str) -> bool:
    module = name.rsplit(".", 1)[0] if "." in name else name
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module, pattern) or (
        name.startswith(pattern + "."))


def _any_name(pg: PruneGraph, pattern: str, params: list[str]) -> bool:
    """Whether ``pattern`` matches a name of one of ``params``, aliases of tied weights included."""
    return any(_matches(pattern, n) for p in params for n in pg.param_names(p))


def _check_globs(pg: PruneGraph, patterns: list[str], what: str) -> None:
    names = {n for p in pg.params() for n in pg.param_names(pg.value(p).param)}
    for pat in patterns:
        if not any(_matches(pat, n) for n in names):
            near = sorted(names)[:5]
            raise ConfigError(f"{what} pattern {pat!r} matches no parameter; names look like "
                              f"{near}")  # fmt: skip


def is_head_group(pg: PruneGraph, g: Group) -> bool:
    """A group indexing attention heads: an axis before the last two of an attention input."""
    for m in g.members:
        for op, slot in pg.consumers(m.value):
            kind = pg.op(op).kind
            rank = len(pg.value(m.value).shape or ())
            if kind in ("sdpa", "matmul") and rank >= 3 and m.axis < rank - 2 and m.axis > 0:
                return True
    return False


def _keep_floor(g: Group, min_keep: float) -> int:
    return max(1, math.ceil(min_keep * g.size))


def _round_keep(pg: PruneGraph, g: Group, keep: int, round_to: int | None) -> int:
    """``keep`` rounded up so that every tensor the group cuts keeps a multiple of ``round_to``.

    A group of whole attention heads cuts ``heads * head_dim`` channels: only the product must
    be a multiple, so ``keep * granularity`` is rounded. Every other group rounds its own count,
    including a per-head dimension (granularity = heads): when heads are pruned as well, only a
    rounded head_dim keeps ``heads_kept * head_dim_kept`` a multiple.
    """
    if not round_to:
        return keep
    q = round_to // math.gcd(round_to, max(g.granularity, 1)) if is_head_group(pg, g) else round_to
    if q <= 1:
        return keep
    return min(g.size, math.ceil(keep / q) * q)


def candidates(pg: PruneGraph, cfg: PruneConfig) -> tuple[list[Group], dict[int, str]]:
    if cfg.ignore:
        _check_globs(pg, cfg.ignore, "ignore")
    if cfg.ratios:
        _check_globs(pg, list(cfg.ratios), "ratios")
    out, excluded = [], {}
    for g in build_coupling(pg).groups:
        if not g.prunable:
            continue
        names = [m.param for m in g.params]
        hit = next((p for p in cfg.ignore or [] if _any_name(pg, p, names)), None)
        if hit:
            excluded[g.id] = f"ignored by {hit!r}"
        elif g.id in (cfg.exclude or {}):
            excluded[g.id] = cfg.exclude[g.id]
        elif not cfg.heads and is_head_group(pg, g):
            excluded[g.id] = "attention heads (heads=False)"
        else:
            out.append(g)
    return out, excluded


def group_ratio(pg: PruneGraph, g: Group, cfg: PruneConfig, default: float) -> float:
    names = [m.param for m in g.params]
    for pat, r in (cfg.ratios or {}).items():
        if _any_name(pg, pat, names):
            return r
    return default


def layer_classes(groups: list[Group]) -> list[list[Group]]:
    """Groups that are the same group in different layers: equal size and the same members once
    layer numbers are taken out of the parameter names (``layers.3.mlp.up_proj.weight`` and
    ``layers.7.mlp.up_proj.weight``). Each class is cut by the same count under ``uniform``."""
    classes: dict[tuple, list[Group]] = {}
    for g in groups:
        sig = tuple(sorted({(re.sub(r"\.\d+\.", ".#.", m.param), m.axis) for m in g.params}))
        classes.setdefault((g.size, sig), []).append(g)
    return list(classes.values())


def _normalised(s: np.ndarray) -> np.ndarray:
    return s / (s.mean() if s.mean() > 0 else 1.0)


def select(pg: PruneGraph, cfg: PruneConfig, scores: dict[int, np.ndarray],
           groups: list[Group], ratio: float) -> dict[int, list[int]]:  # fmt: skip
    """Indices to remove per group at ``ratio`` under the config's scope and limits.

    With ``cfg.uniform`` every :func:`layer_classes` class loses the same count in each of its
    groups: the smallest count its members would lose locally, or, under global scope, a count
    ranked by the class's importance summed across its layers (rank by rank)."""
    removal: dict[int, list[int]] = {}
    n_remove: dict[int, int] = {}
    units = layer_classes(groups) if cfg.uniform else [[g] for g in groups]
    pooled = []
    for unit in units:
        local = {}
        for g in unit:
            max_remove = g.size - _keep_floor(g, cfg.min_keep)
            names = [m.param for m in g.params]
            if cfg.scope == "local" or any(_any_name(pg, p, names) for p in cfg.ratios or {}):
                local[g.id] = min(math.floor(group_ratio(pg, g, cfg, ratio) * g.size),
                                  max_remove)  # fmt: skip
        if len(local) == len(unit) or (local and cfg.uniform):
            # a class with an override on some of its layers gets the smallest cut in all
            n_remove.update({g.id: min(local.values()) for g in unit})
        else:
            n_remove.update(local)
            pooled.append([g for g in unit if g.id not in local])
    if pooled:
        total = sum(g.size for unit in pooled for g in unit)
        budget = math.floor(ratio * total)
        entries = []
        for u, unit in enumerate(pooled):
            summed = sum(np.sort(_normalised(scores[g.id]), kind="stable") for g in unit)
            entries += [(float(v) / len(unit), u, rank) for rank, v in enumerate(summed)]
        entries.sort()
        limits = [min(g.size - _keep_floor(g, cfg.min_keep) for g in unit) for unit in pooled]
        taken = [0] * len(pooled)
        for _, u, rank in entries:
            if budget <= 0:
                break
            if rank == taken[u] and taken[u] < limits[u]:
                taken[u] += 1
                budget -= len(pooled[u])
        n_remove.update({g.id: taken[u] for u, unit in enumerate(pooled) for g in unit})
    by_id = {g.id: g for g in groups}
    for gid, k in n_remove.items():
        g = by_id[gid]
        keep = _round_keep(pg, g, g.size - k, cfg.round_to)
        k = g.size - keep
        if k > 0:
            order = np.argsort(scores[gid], kind="stable")
            removal[gid] = sorted(order[:k].tolist())
    return removal


def compute_scores(pg: PruneGraph, cfg: PruneConfig, groups: list[Group]) -> tuple[dict, list]:
    ctx = criteria.CriterionContext(pg, cfg.calib, cfg.loss_fn, cfg.seed)
    fn = criteria.get(cfg.criterion)
    scores = {}
    for g in groups:
        s = np.asarray(fn(ctx, g), dtype=np.float64)
        if s.shape != (g.size,):
            raise ConfigError(f"criterion returned shape {s.shape} for group {g.id} of size "
                              f"{g.size}: return one score per group index")  # fmt: skip
        if not np.isfinite(s).all():
            raise ConfigError(f"criterion produced NaN/inf scores for group {g.id} "
                              f"({g.describe()}): check the weights and calibration data")
        scores[g.id] = s
    return scores, ctx.notes


def run(pg: PruneGraph, cfg: PruneConfig) -> Selection:
    """Choose what to remove: scores, scope, overrides and (optionally) a cost target."""
    cfg.validate()
    groups, excluded = candidates(pg, cfg)
    target = cfg.target_macs if cfg.target_macs is not None else cfg.target_params
    if not groups:
        if target is not None and target < 1.0 or cfg.ratio > 0:
            why = "; ".join(f"{g.id}: {g.frozen_reason}" for g in build_coupling(pg).groups[:5] if g.frozen_reason)
            raise ConfigError(f"nothing can be pruned in {pg.name}: every group is frozen or "
                              f"ignored ({why} ...). See graphprune.explain(pg).")  # fmt: skip
        return Selection({}, {}, excluded)
    scores, notes = compute_scores(pg, cfg, groups)
    if target is None:
        return Selection(select(pg, cfg, scores, groups, cfg.ratio), scores, excluded, cfg.ratio,
                         notes)  # fmt: skip
    metric = "macs" if cfg.target_macs is not None else "params"
    base = getattr(cost_model.count(pg), metric)

    def frac(r: float) -> tuple[float, dict]:
        rem = select(pg, cfg, scores, groups, r)
        plan = plan_removal(pg, rem)
        return getattr(cost_model.count(pg, plan.new_shapes), metric) / base, rem

    hi_frac, hi_rem = frac(0.999)
    if hi_frac > target + 1e-9:
        raise ConfigError(f"target_{metric}={target} cannot be met: with every prunable group at "
                          f"its limit (min_keep={cfg.min_keep}) {metric} stay at {hi_frac:.1%} of "
                          "the original")  # fmt: skip
    lo, hi, best = 0.0, 0.999, (hi_frac, hi_rem, 0.999)
    for _ in range(20):
        mid = (lo + hi) / 2
        f, rem = frac(mid)
        if f <= target:
            hi, best = mid, (f, rem, mid)
        else:
            lo = mid
    notes.append(f"target_{metric}={target}: ratio {best[2]:.3f} gives {best[0]:.1%}")
    return Selection(best[1], scores, excluded, best[2], notes)


@dataclass(frozen=True)
class PruneChannels:
    """:func:`run` as a pass: ``run(pg, config=PruneConfig(...))`` gives ``PassResult(Selection)``.

    Requires ``BuildCoupling``; ``changed`` is True when the selection removes anything. The
    report holds the ratio used, the number of groups cut and of indices removed.
    """

    name: str = "PruneChannels"
    requires: tuple[str, ...] = ("BuildCoupling",)

    def run(self, graph: PruneGraph, *, config: PruneConfig) -> PassResult[Selection]:
        sel = run(graph, config)
        removed = sum(len(idx) for idx in sel.removal.values())
        report = {"ratio": sel.ratio_used, "groups": len(sel.removal), "indices": removed}
        return PassResult(sel, removed > 0, report)
