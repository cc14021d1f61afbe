"""Schedules around ``gp.prune``: iterative (linear or AGP) pruning with fine-tuning between
steps, lottery-ticket rewinding, and per-group sensitivity analysis.

Every step re-captures the current model, so each step sees the shapes the previous one left;
parameter names survive write-back (module form and GraphModule keep the same dotted names), which
is what lets kept indices be composed across steps and mapped back to an earlier state.
"""

from __future__ import annotations

import copy
import inspect
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graphprune.api.graph import capture
from graphprune.api.options import check_iterative_options
from graphprune.api.structured import PruneReport, PruneResult, prune
from graphprune.ir.errors import ConfigError
from graphprune.passes.coupling import build_coupling


def schedule_fractions(ratio: float, steps: int, schedule: str) -> list[float]:
    """Cumulative fraction removed after each step.

    ``linear``: ratio·t/n. ``agp`` (Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)(1 − t/n)³ with
    s_i = 0, so most is removed early, while the network still has capacity to recover.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps}: need at least one step")
    if schedule == "linear":
        return [ratio * t / steps for t in range(1, steps + 1)]
    if schedule == "agp":
        return [ratio + (0.0 - ratio) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]
    raise ConfigError(f"schedule={schedule!r}: use 'linear' or 'agp'")


Kept = dict[str, dict[int, np.ndarray]]  # param name → axis → kept indices of the original


def kept_indices(result: PruneResult, before: Kept | None = None) -> Kept:
    """Original indices each parameter still holds after ``result`` (composed with ``before``)."""
    pg, plan = result.graph, result.plan
    out: Kept = {k: dict(v) for k, v in (before or {}).items()}
    for v in pg.params():
        name = pg.value(v).param
        for a in range(len(pg.value(v).shape or ())):
            k = plan.kept(v, a)
            if k is None:
                continue
            prev = out.get(name, {}).get(a)
            out.setdefault(name, {})[a] = k if prev is None else prev[k]
    return out


@dataclass
class IterativeResult:
    model: Any
    reports: list[PruneReport]
    fractions: list[float]
    kept: Kept = field(default_factory=dict)


def prune_iteratively(model: torch.nn.Module, example_inputs: Any, ratio: float, steps: int = 3,
                      schedule: str = "linear", fine_tune: Callable[[Any, int], Any] | None = None,
                      **prune_kwargs: Any) -> IterativeResult:  # fmt: skip
    """Prune to ``ratio`` in ``steps`` steps, calling ``fine_tune(model, step)`` after each.

    ``fine_tune`` may return a new model (else the one it was given is used). Other keyword
    arguments go to :func:`graphprune.prune` (``criterion``, ``scope``, ``calib``, ...).

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    >>> res = gp.prune_iteratively(m, (torch.randn(2, 8),), ratio=0.5, steps=2, schedule="agp")
    >>> [round(f, 3) for f in res.fractions], res.model[0].out_features
    ([0.438, 0.5], 16)
    """
    if "inplace" in prune_kwargs:
        raise ConfigError("prune_iteratively always works on copies; drop inplace=")
    unknown = sorted(set(prune_kwargs) - set(inspect.signature(prune).parameters))
    if unknown:
        raise ConfigError(f"prune_iteratively got {unknown}, which gp.prune does not take")
    check_iterative_options(ratio, steps, schedule, fine_tune, prune_kwargs)
    fractions = schedule_fractions(ratio, steps, schedule)
    current, done, reports, kept = model, 0.0, [], {}
    for step, target in enumerate(fractions, 1):
        r = (target - done) / (1.0 - done) if done < 1 else 0.0
        res = prune(current, example_inputs, ratio=max(0.0, min(r, 0.999)), **prune_kwargs)
        kept = kept_indices(res, kept)
        reports.append(res.report)
        current, done = res.model, target
        if fine_tune is not None:
            tuned = fine_tune(current, step)
            current = tuned if tuned is not None else current
    return IterativeResult(current, reports, fractions, kept)


def rewind(model: torch.nn.Module, initial_state: dict[str, torch.Tensor], kept: Kept) -> Any:
    """Lottery-ticket rewinding: keep ``model``'s structure, take weights from ``initial_state``
    (the state dict saved at initialisation or early in training), sliced to the kept indices.

    ``kept`` comes from :func:`kept_indices` (one-shot) or ``IterativeResult.kept``.
    """
    out = copy.deepcopy(model)
    params = {**dict(out.named_parameters()), **dict(out.named_buffers())}
    with torch.no_grad():
        for name, t in params.items():
            if name not in initial_state:
                raise ConfigError(f"initial_state has no {name!r}: pass the state dict of the "
                                  "model before pruning")  # fmt: skip
            w = initial_state[name].detach().clone()
            for axis, idx in kept.get(name, {}).items():
                w = w.index_select(axis, torch.as_tensor(idx, dtype=torch.long))
            if w.shape != t.shape:
                raise ConfigError(f"{name}: rewound shape {tuple(w.shape)} does not match the "
                                  f"pruned {tuple(t.shape)}")  # fmt: skip
            t.copy_(w)
    return out


@dataclass
class Sensitivity:
    """Metric after pruning each group alone at each ratio (higher is better unless told)."""

    ratios: list[float]
    baseline: float
    rows: list[tuple[int, str, list[float]]]

    def to_text(self) -> str:
        head = f"{'group':>5}  {'layer':40s} " + " ".join(f"{r:>8.2f}" for r in self.ratios)
        lines = [f"baseline {self.baseline:.4f}", head]
        for gid, name, vals in self.rows:
            lines.append(f"{gid:>5}  {name[:40]:40s} " + " ".join(f"{v:>8.4f}" for v in vals))
        return "\n".join(lines)

    def suggest_ratios(self, max_drop: float) -> dict[int, float]:
        """Per group: the largest tested ratio whose metric stays within ``max_drop``."""
        out = {}
        for gid, _, vals in self.rows:
            ok = [r for r, v in zip(self.ratios, vals) if self.baseline - v <= max_drop]
            out[gid] = max(ok) if ok else 0.0
        return out

    def plot(self, path: str) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for gid, name, vals in self.rows:
            ax.plot(self.ratios, vals, marker="o", label=f"{gid}: {name[:30]}")
        ax.axhline(self.baseline, color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("fraction of the group removed")
        ax.set_ylabel("metric")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def sensitivity(model: Any, example_inputs: Any, eval_fn: Callable[[Any], float],
                ratios: Iterable[float] = (0.25, 0.5, 0.75), criterion: str = "l2",
                groups: Iterable[int] | None = None, plot: str | None = None,
                executor: Any = "serial") -> Sensitivity:  # fmt: skip
    """Prune each group alone at each ratio and evaluate: the table to choose ``ratios=`` from.

    ``eval_fn(model) -> float`` sees the original model (baseline) and each pruned one.
    A plot is written to ``plot`` when given and matplotlib is installed.

    ``executor`` runs the (group, ratio) trials: ``"serial"`` here, ``"ray"`` as one Ray task
    each (the Ray session already initialised, else a local cluster), ``"ray:<address>"`` /
    ``"ray://host:port"`` on a cluster (see :mod:`graphprune.api.executors`). The scores and the
    channels removed are chosen here; each Ray worker captures the model once (a capture does
    not pickle) and applies the same removals, so the table equals the serial one whenever
    ``eval_fn`` is deterministic (run on one thread for bit-equal floats: Ray tasks use one).
    ``model``, ``example_inputs`` and ``eval_fn`` must pickle for Ray (closures do).

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(16, 4)
    >>> sens = gp.sensitivity(m, (x,), lambda mm: float(mm(x).abs().mean()), ratios=[0.5])
    >>> [(gid, len(vals)) for gid, _, vals in sens.rows]
    [(0, 1)]
    """
    from graphprune.api.executors import get_executor
    from graphprune.passes.prune import criteria

    ratios = list(ratios)
    run = get_executor(executor)
    pg = capture(model, example_inputs)
    ctx = criteria.CriterionContext(pg)
    fn = criteria.get(criterion)
    wanted = None if groups is None else set(groups)
    chosen = [g for g in build_coupling(pg).groups
              if g.prunable and (wanted is None or g.id in wanted)]  # fmt: skip
    baseline = float(eval_fn(model))
    trials = []
    for g in chosen:
        s = np.asarray(fn(ctx, g))
        for r in ratios:
            k = min(int(np.floor(r * g.size)), g.size - 1)
            trials.append(({g.id: sorted(np.argsort(s, kind="stable")[:k].tolist())} if k
                           else {},))
    sweep = _Sweep(model, example_inputs, eval_fn, uuid.uuid4().hex, pg)
    vals = run.map(_sensitivity_trial, sweep, trials)
    n = len(ratios)
    rows = [(g.id, g.params[0].param if g.params else str(g.id), vals[i * n : (i + 1) * n])
            for i, g in enumerate(chosen)]
    result = Sensitivity(ratios, baseline, rows)
    if plot:
        try:
            result.plot(plot)
        except ImportError:
            pass
    return result


@dataclass
class _Sweep:
    """What every sensitivity trial needs. The capture stays behind when pickled (a captured
    GraphModule does not unpickle): a worker captures ``model`` once per sweep (``token``)."""

    model: Any
    example_inputs: Any
    eval_fn: Callable[[Any], float]
    token: str
    graph: Any = None

    def __getstate__(self):
        return {**self.__dict__, "graph": None}

    def captured(self):
        if self.graph is None:
            if _WORKER_CAPTURE.get("token") != self.token:
                _WORKER_CAPTURE.clear()  # one sweep's capture per worker process at a time
                _WORKER_CAPTURE.update(token=self.token,
                                       graph=capture(self.model, self.example_inputs))
            self.graph = _WORKER_CAPTURE["graph"]
        return self.graph


_WORKER_CAPTURE: dict[str, Any] = {}


def _sensitivity_trial(sweep: _Sweep, removal: dict[int, list[int]]) -> float:
    """One trial: the captured model with ``removal`` applied, evaluated."""
    from graphprune.passes.prune.plan import plan_removal

    pg = sweep.captured()
    return float(sweep.eval_fn(pg.source.apply_plan(pg, plan_removal(pg, removal))))
