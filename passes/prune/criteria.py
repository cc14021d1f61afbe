"""Importance criteria for structured pruning: one small function per criterion.

A criterion maps a group to one score per group index (higher = more important); scores
aggregate over every coupled member (``Coupling.coords`` gives each member position's group
index). Criteria needing data read :class:`CriterionContext`, which gathers calibration
statistics once per pruning call. Register new ones with ``@criterion("name")``; users may
also pass any callable ``fn(ctx, group) -> np.ndarray``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphprune.ir.errors import ConfigError
from graphprune.ir import PruneGraph
from graphprune.passes.prune.calibration import AxisStats, GradStats, activation_stats, gradient_stats
from graphprune.passes.coupling import Group
from graphprune.passes.coupling import build_coupling


@dataclass
class CriterionContext:
    pg: PruneGraph
    calib: Any = None
    loss_fn: Callable | None = None
    seed: int = 0
    _acts: dict[tuple[str, int], AxisStats] | None = None
    _grads: GradStats | None = None
    notes: list[str] = field(default_factory=list)

    def per_position(self, group: Group, member_values: dict) -> np.ndarray:
        """Sum per-position arrays of members into one score per group index.

        ``member_values`` maps ``(value id, axis)`` to an array along that member's axis. A
        plain value id is accepted where the value is in the group on one axis only (a weight
        read on two axes of one group, e.g. by ``x`` and ``cat(x, x)``, needs the axis)."""
        cp = build_coupling(self.pg)
        out = np.zeros(group.size)
        axes_of: dict[str, int] = {}
        for m in group.members:
            axes_of[m.value] = axes_of.get(m.value, 0) + 1
        for m in group.members:
            arr = member_values.get((m.value, m.axis))
            if arr is None and m.value in member_values:
                if axes_of[m.value] > 1:
                    raise ConfigError(
                        f"criterion scores for {m.value!r} are keyed by value alone, but it is in "
                        f"group {group.id} on {axes_of[m.value]} axes: key them by (value, axis)"
                    )
                arr = member_values[m.value]
            if arr is None:
                continue
            coords = cp.coords(cp.axis_var[(m.value, m.axis)], group.var)
            ok = coords >= 0
            out += np.bincount(coords[ok], weights=np.asarray(arr, float)[ok], minlength=group.size)
        return out

    def acts(self) -> dict[tuple[str, int], AxisStats]:
        if self._acts is None:
            wanted = set()
            for g in build_coupling(self.pg).groups:
                if not g.prunable:
                    continue
                for m in g.members:
                    if m.param is None and self.pg.value(m.value).role in ("activation", "input"):
                        wanted.add((m.value, m.axis))
            self._acts = activation_stats(self.pg, self.calib, wanted)
        return self._acts

    def grads(self) -> GradStats:
        if self._grads is None:
            self._grads = gradient_stats(self.pg, self.calib, self.loss_fn)
        return self._grads


Criterion = Callable[[CriterionContext, Group], np.ndarray]
CRITERIA: dict[str, Criterion] = {}
NEEDS_CALIB = {"taylor", "hessian", "apoz", "activation", "wanda"}


def criterion(name: str) -> Callable[[Criterion], Criterion]:
    def deco(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return deco


_CHUNK_BYTES = 1 << 25  # float64 working set per slice of a weight in abs_power_sums


def abs_power_sums(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    """``sum |w|^p`` per position of ``axis``, in float64, over slices of at most 32 MiB: a
    whole-weight float64 copy of an LLM's embedding would cost twice its bytes (twice again for
    ``|w|^p``). Each position's values are summed as one contiguous float64 row, so the scores
    do not depend on the slicing."""
    n = w.shape[axis]
    per_row = 8 * (w.size // n) if n else 1
    step = max(1, _CHUNK_BYTES // max(per_row, 1))
    out = np.empty(n, dtype=np.float64)
    index: list[slice] = [slice(None)] * w.ndim
    for start in range(0, n, step):
        index[axis] = slice(start, start + step)
        part = w[tuple(index)]
        rows = np.ascontiguousarray(np.moveaxis(part, axis, 0).reshape(part.shape[axis], -1),
                                    dtype=np.float64)
        np.abs(rows, out=rows)
        if p != 1:
            rows **= p
        out[start:start + step] = rows.sum(1)
    return out


def _param_norms(ctx: CriterionContext, group: Group, p: int) -> np.ndarray:
    vals = {}
    for m in group.params:
        w = np.asarray(ctx.pg.weights[m.param])
        if w.ndim and ctx.pg.value(m.value).trainable:
            vals[m.value, m.axis] = abs_power_sums(w, m.axis, p)
    return ctx.per_position(group, vals)


@criterion("l1")
def l1(ctx: CriterionContext, group: Group) -> np.ndarray:
    """Sum of |w| over every coupled weight slice (Li et al. 2017)."""
    return _param_norms(ctx, group, 1)


@criterion("l2")
def l2(ctx: CriterionContext, group: Group) -> np.ndarray:
    """Sum of w² over every coupled weight slice (squared L2 norm of the group slice)."""
    return _param_norms(ctx, group, 2)


def lowest(scores: np.ndarray, ratio: float) -> list[int]:
    """Indices of the ``ratio`` fraction with the lowest scores (always keeps at least one)."""
    k = min(int(np.floor(ratio * len(scores))), len(scores) - 1)
    return sorted(np.argsort(scores, kind="stable")[:k].tolist())


@criterion("random")
def random(ctx: CriterionContext, group: Group) -> np.ndarray:
    return np.random.default_rng(ctx.seed + group.id).random(group.size)


@criterion("fpgm")
def fpgm(ctx: CriterionContext, group: Group) -> np.ndarray:
    """Distance to the other filters (He et al. 2019): near the geometric median = replaceable."""
    cp = build_coupling(ctx.pg)
    feats = []
    for m in group.params:
        w = np.asarray(ctx.pg.weights[m.param], dtype=np.float64)
        if not w.ndim or not ctx.pg.value(m.value).trainable:
            continue
        coords = cp.coords(cp.axis_var[(m.value, m.axis)], group.var)
        rows = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)
        ok = coords >= 0
        order = np.argsort(coords[ok], kind="stable")
        feats.append(rows[ok][order].reshape(group.size, -1))
    if not feats:
        ctx.notes.append(f"group {group.id}: no trainable weight, fpgm fell back to l2")
        return l2(ctx, group)
    x = np.concatenate(feats, axis=1)
    sq = (x * x).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
    return d.sum(1)


def _bn_scale_members(ctx: CriterionContext, group: Group) -> dict[str, np.ndarray]:
    vals = {}
    for m in group.params:
        for op, slot in ctx.pg.consumers(m.value):
            if ctx.pg.op(op).kind == "batch_norm" and slot == 1:
                gamma = np.asarray(ctx.pg.weights[m.param], dtype=np.float64)
                vals[m.value, m.axis] = np.abs(gamma)
    return vals


@criterion("bn_scale")
def bn_scale(ctx: CriterionContext, group: Group) -> np.ndarray:
    """|γ| of the BatchNorms in the group (Network Slimming, Liu et al. 2017)."""
    vals = _bn_scale_members(ctx, group)
    if not vals:
        ctx.notes.append(f"group {group.id}: no BatchNorm, bn_scale fell back to l2")
        return l2(ctx, group)
    return ctx.per_position(group, vals)


def _grad_members(ctx: CriterionContext, group: Group, table: dict[str, np.ndarray],
                  reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:  # fmt: skip
    vals = {}
    for m in group.params:
        t = table.get(m.param)
        if t is None or not np.ndim(t):
            continue
        vals[m.value, m.axis] = reduce(np.moveaxis(t, m.axis, 0).reshape(t.shape[m.axis], -1))
    return ctx.per_position(group, vals)


@criterion("taylor")
def taylor(ctx: CriterionContext, group: Group) -> np.ndarray:
    """First-order Taylor |Σ g·w| over the group's weights (Molchanov et al. 2019)."""
    g = ctx.grads()
    signed = _grad_members(ctx, group, g.gw, lambda a: a.sum(1))
    return np.abs(signed) / g.batches


@criterion("hessian")
def hessian(ctx: CriterionContext, group: Group) -> np.ndarray:
    """OBD saliency ½·H_ii·w² with the Fisher diagonal E[g²] for H_ii (LeCun et al. 1990)."""
    g = ctx.grads()
    w2f = {name: 0.5 * g.fisher[name] * np.asarray(ctx.pg.weights[name], float) ** 2 / g.batches
           for name in g.fisher if name in ctx.pg.weights}  # fmt: skip
    return _grad_members(ctx, group, w2f, lambda a: a.sum(1))


def _value_members(ctx: CriterionContext, group: Group, fn: Callable[[AxisStats], np.ndarray],
                   only_post_activation: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    acts = ctx.acts()
    vals = {}
    for m in group.members:
        s = acts.get((m.value, m.axis))
        if s is None or m.param is not None:
            continue
        if only_post_activation:
            prod = ctx.pg.producer(m.value)
            if prod is None or ctx.pg.op(prod).kind != "activation":
                continue
        vals[m.value, m.axis] = fn(s)
    return vals


@criterion("activation")
def activation(ctx: CriterionContext, group: Group) -> np.ndarray:
    """Mean |activation| of the group's channels over calibration data, read after the
    nonlinearity where the group has one (a pre-ReLU value says little about use)."""
    fn = lambda s: s.abs / max(s.n, 1)  # noqa: E731
    vals = _value_members(ctx, group, fn, True) or _value_members(ctx, group, fn)
    return ctx.per_position(group, vals)


@criterion("apoz")
def apoz(ctx: CriterionContext, group: Group) -> np.ndarray:
    """1 − average percentage of zeros after the activation (Hu et al. 2016): higher = busier."""
    vals = _value_members(ctx, group, lambda s: 1.0 - s.zeros / max(s.n, 1), True)
    if not vals:
        ctx.notes.append(f"group {group.id}: no activation output, apoz fell back to activation")
        return activation(ctx, group)
    return ctx.per_position(group, vals)


@criterion("wanda")
def wanda(ctx: CriterionContext, group: Group) -> np.ndarray:
    """|W|·‖X‖ (Sun et al. 2023) summed over the group's consumer weights: for every weight
    member read along its input axis, each weight times the norm of the input channel."""
    acts = ctx.acts()
    pg = ctx.pg
    vals = {}
    for m in group.params:
        for op, slot in pg.consumers(m.value):
            kind = pg.op(op).kind
            slots = pg.op(op).attrs.get("slots", (0, 1, 2))
            if kind not in ("linear", "conv") or slot != slots[1]:
                continue
            in_axis = 1 if kind == "conv" or pg.op(op).attrs.get("w_layout", "oi") == "oi" else 0
            x = pg.op_inputs(op)[slots[0]]
            xs = acts.get((x, 1 if kind == "conv" else len(pg.value(x).shape) - 1))
            w = np.asarray(pg.weights[m.param])
            if xs is None or m.axis != in_axis or len(xs.norm) != w.shape[in_axis]:
                continue
            rows = abs_power_sums(w, in_axis, 1)
            vals[m.value, m.axis] = vals.get((m.value, m.axis), 0) + rows * xs.norm
    if not vals:
        ctx.notes.append(f"group {group.id}: no consumer weight reads it, wanda fell back to l1")
        return l1(ctx, group)
    return ctx.per_position(group, vals)


def get(name_or_fn: str | Criterion) -> Criterion:
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in CRITERIA:
        raise ConfigError(f"unknown criterion {name_or_fn!r}: use one of {', '.join(sorted(CRITERIA))} "
                          "or pass a callable fn(ctx, group) -> scores")  # fmt: skip
    return CRITERIA[name_or_fn]
