"""Calibration statistics for data-driven criteria, gathered on the captured graph.

``activation_stats`` runs the captured program (an ``fx.Interpreter`` over the unlifted
``ExportedProgram``) on calibration batches and reduces chosen values to per-position statistics
along one axis (sum of squares, sum of |x|, zero count, count). ``gradient_stats`` runs
forward/backward with a loss and accumulates per-parameter first- and second-order terms.
Both read the capture, never the user's module, and leave it untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphprune.frontends.torch.outputs import flatten_outputs
from graphprune.ir import PruneGraph
from graphprune.ir.errors import ConfigError, GraphPruneError


@dataclass
class AxisStats:
    sq: np.ndarray  # sum of squares per position
    abs: np.ndarray  # sum of |x| per position
    zeros: np.ndarray  # count of exact zeros per position
    n: int  # elements per position seen

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sq)


def calibration_batches(calib: Any, pg: PruneGraph | None = None) -> list[tuple]:
    """Calibration batches, split into chunks of the captured batch size (the captured program
    has static shapes, so each run must see exactly the example inputs' batch size)."""
    return [b for _, b in _numbered_batches(calib, pg)]


def _numbered_batches(calib: Any, pg: PruneGraph | None) -> list[tuple[int, tuple]]:
    """``(index of the user's batch, chunk)`` for every chunk :func:`calibration_batches` cuts;
    each batch is checked against the captured inputs (:func:`_check_batch`) first."""
    if calib is None:
        raise ConfigError("this criterion needs calibration data: pass calib=[batch, ...] where "
                          "each batch is a tuple of input tensors like example_inputs")  # fmt: skip
    out = []
    n0 = None
    if pg is not None and pg.inputs and pg.value(pg.inputs[0]).shape:
        n0 = pg.value(pg.inputs[0]).shape[0]
    names = list(pg.source.kwargs) if pg is not None and pg.frontend == "torch" else []
    for i, b in enumerate(calib):
        if isinstance(b, Mapping):
            b = _from_dict(b, names)
        b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if pg is not None:
            _check_batch(pg, i, b)
        n = b[0].shape[0] if isinstance(b[0], torch.Tensor) and b[0].dim() else None
        if n0 is None or n == n0:
            out.append((i, b))
            continue
        if n is None or n % n0:
            raise ConfigError(f"calibration batch {i} has size {n}: the model was captured with "
                              f"batch {n0}, so calibration batches must have a multiple of {n0} "
                              "rows")  # fmt: skip
        for j in range(0, n, n0):
            out.append((i, tuple(t[j : j + n0] if isinstance(t, torch.Tensor) and t.dim() else t
                                 for t in b)))  # fmt: skip
    if not out:
        raise ConfigError("calib is empty: pass at least one batch")
    return out


def _dtype_name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def _dtype_kind(name: str) -> str:
    return "bool" if name == "bool" else "float" if "float" in name else "integer"


def _inputs_of(pg: PruneGraph, b: tuple) -> list[tuple[int, str, Any]]:
    """``(position, input value id, tensor)`` for the leading items of ``b`` that feed the
    captured inputs; empty when they do not line up one to one (a non-tensor argument)."""
    items = b[: len(pg.inputs)]
    if len(items) < len(pg.inputs) or not all(hasattr(t, "shape") and hasattr(t, "dtype")
                                              for t in items):  # fmt: skip
        return []
    return list(zip(range(len(items)), pg.inputs, items))


def _check_batch(pg: PruneGraph, i: int, b: tuple) -> None:
    """Refuse a batch whose tensors cannot be the captured inputs: too few of them, another rank
    or another kind of dtype (float / integer / bool). Sizes are left to the run (an axis may be
    symbolic); :func:`_batch_error` explains a run that fails on them."""
    if len(b) < len(pg.inputs):
        raise ConfigError(f"calibration batch {i} holds {len(b)} item(s), but the model was "
                          f"captured with {len(pg.inputs)} inputs {list(pg.inputs)}: each batch "
                          "is a tuple of input tensors like example_inputs")  # fmt: skip
    for k, vid, t in _inputs_of(pg, b):
        want = pg.value(vid)
        if want.shape is None:
            continue
        got = tuple(t.shape)
        if len(got) != len(want.shape):
            raise ConfigError(f"calibration batch {i}, input {k} ({vid!r}): expected rank "
                              f"{len(want.shape)} (captured shape {tuple(want.shape)}), got rank "
                              f"{len(got)} (shape {got}); pass tensors shaped like "
                              "example_inputs")  # fmt: skip
        if _dtype_kind(_dtype_name(t)) != _dtype_kind(want.dtype):
            raise ConfigError(f"calibration batch {i}, input {k} ({vid!r}): expected dtype "
                              f"{want.dtype} (as captured), got {_dtype_name(t)}; convert it, "
                              f"e.g. tensor.to(torch.{want.dtype})")  # fmt: skip


def _batch_error(pg: PruneGraph, i: int, b: tuple, e: BaseException) -> ConfigError | None:
    """A :class:`ConfigError` for a calibration batch the captured model failed on, naming the
    inputs that differ from the captured ones; ``None`` when none differs (then the failure is
    not the batch's fault and the original error stands)."""
    diffs = []
    for k, vid, t in _inputs_of(pg, b):
        want = pg.value(vid)
        got, got_dtype = tuple(t.shape), _dtype_name(t)
        if (want.shape is not None and got != tuple(want.shape)) or got_dtype != want.dtype:
            diffs.append(f"input {k} ({vid!r}): expected {tuple(want.shape or ())} {want.dtype} "
                         f"(as captured), got {got} {got_dtype}")  # fmt: skip
    if not diffs:
        return None
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return ConfigError(f"calibration batch {i} does not run through the captured model: "
                       + "; ".join(diffs) + f" ({type(e).__name__}: {first}). Pass batches "
                       "shaped like example_inputs (a batch may hold a multiple of the captured "
                       "batch size).")  # fmt: skip


def _from_dict(b: Mapping, names: list[str]) -> tuple:
    """A keyword batch (``{"input_ids": ..., "labels": ...}``) in the captured keyword order."""
    missing = [n for n in names if n not in b]
    unknown = [k for k in b if k not in names]
    if missing or unknown:
        raise ConfigError(
            f"calibration batch keys {sorted(b)} do not match the captured inputs {names}: "
            + (f"missing {missing}; " if missing else "")
            + (f"{unknown} were not in example_inputs (pass them there too)" if unknown else "")
        )
    return tuple(b[n] for n in names)


def activation_stats(pg: PruneGraph, calib: Iterable,
                     wanted: set[tuple[str, int]]) -> dict[tuple[str, int], AxisStats]:  # fmt: skip
    """Per-position statistics of each (value id, axis) in ``wanted`` over ``calib``."""
    axes: dict[str, list[int]] = {}
    for v, a in wanted:
        axes.setdefault(v, []).append(a)
    stats: dict[tuple[str, int], AxisStats] = {}

    def accumulate(v: str, out: torch.Tensor) -> None:
        for ax in axes[v]:
            x = out.detach().float()
            x = x.movedim(ax, 0).reshape(x.shape[ax], -1)
            s = AxisStats(x.pow(2).sum(1).numpy(), x.abs().sum(1).numpy(),
                          (x == 0).sum(1).numpy(), x.shape[1])  # fmt: skip
            if not np.isfinite(s.sq).all():
                raise ConfigError(f"calibration produced NaN/inf at {v!r}; check the "
                                  "calibration batches")  # fmt: skip
            o = stats.get((v, ax))
            stats[(v, ax)] = s if o is None else AxisStats(
                o.sq + s.sq, o.abs + s.abs, o.zeros + s.zeros, o.n + s.n)

    current: list[tuple[int, tuple]] = []

    def batches() -> Iterable[tuple]:
        for i, b in _numbered_batches(calib, pg):
            current[:] = [(i, b)]
            yield b

    # A generator, so that a frontend that cannot run data says so before the batches are read.
    try:
        pg.source.observe(batches(), axes, accumulate)
    except GraphPruneError:
        raise
    except Exception as e:
        err = _batch_error(pg, *current[0], e) if current else None
        if err is None:
            raise
        raise err from e
    return stats


@dataclass
class GradStats:
    gw: dict[str, np.ndarray]  # per parameter: sum over batches of (g * w) (same shape)
    gw_sq: dict[str, np.ndarray]  # per parameter: sum over batches of (g * w)^2
    fisher: dict[str, np.ndarray]  # per parameter: sum over batches of g^2
    batches: int


def _field(out: Any, name: str) -> Any:
    """``out[name]`` for a mapping output (a ``transformers`` ``ModelOutput`` is an OrderedDict)."""
    return out.get(name) if isinstance(out, Mapping) else None


def default_loss(out: Any, batch: tuple = (), n_inputs: int | None = None) -> torch.Tensor:
    """The loss gradient criteria differentiate when no ``loss_fn`` is given.

    A model that computed its own loss (a ``transformers`` model given ``labels``) is trusted:
    that loss is used. Otherwise a label-free proxy: half the mean squared ``logits`` or
    ``last_hidden_state`` when the output names them, else of every floating output (the model's
    own output scale). Labels riding in a batch after the model's inputs, which a captured
    ``ModelOutput`` model did not take, are a :class:`ConfigError` rather than silently ignored.
    """
    loss = _field(out, "loss")
    if isinstance(loss, torch.Tensor):
        return loss
    extra = len(batch) - n_inputs if n_inputs is not None else 0
    if extra > 0 and isinstance(out, Mapping):
        raise ConfigError(
            "the calibration batches carry labels but the captured model computes no loss: pass "
            "the labels in example_inputs too, as a dict (example_inputs={'input_ids': ids, "
            "'labels': ids}, and calib batches as dicts with the same keys) so the model returns "
            "its own loss, or pass loss_fn=lambda out, batch: ..."
        )
    for name in ("logits", "last_hidden_state"):
        t = _field(out, name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return 0.5 * t.pow(2).mean()
    ts = [t for t in flatten_outputs(out) if t.is_floating_point()]
    if not ts:
        raise ConfigError(
            "gradient criteria (taylor, hessian) need a loss, and this model returned no loss and "
            "no floating-point output: pass labels in example_inputs and calib (a dict with "
            "'labels' for a transformers model) or loss_fn=lambda out, batch: ..."
        )
    return sum(0.5 * t.pow(2).mean() for t in ts)


def _call(gm: torch.nn.Module, pg: PruneGraph, b: tuple) -> Any:
    """Run the captured module on one calibration batch, by keyword where it was captured so."""
    args, kwargs = pg.source.args, pg.source.kwargs
    if not kwargs:
        return gm(*b[: len(args)])
    names = list(kwargs)
    return gm(*b[: len(args)], **dict(zip(names, b[len(args) : len(args) + len(names)])))


def gradient_stats(pg: PruneGraph, calib: Iterable,
                   loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None) -> GradStats:  # fmt: skip
    """Gradients of ``loss_fn(output, batch)`` (default: :func:`default_loss`) per parameter."""
    if pg.frontend != "torch":
        raise ConfigError("gradient criteria (taylor, hessian) need a torch capture")
    gm = pg.source.graph_module()
    # By the names the graph uses (tied weights appear under one name only).
    params = pg.source.parameters(gm)
    params = {k: p for k, p in params.items() if isinstance(p, torch.nn.Parameter)}
    for p in params.values():
        p.requires_grad_(True)
    gw: dict[str, np.ndarray] = {}
    gw_sq: dict[str, np.ndarray] = {}
    fisher: dict[str, np.ndarray] = {}
    n = 0
    n_in = len(pg.inputs)
    for i, b in _numbered_batches(calib, pg):
        gm.zero_grad(set_to_none=True)
        try:
            out = _call(gm, pg, b)  # extra items in a batch (labels) are for loss_fn
        except Exception as e:
            err = _batch_error(pg, i, b, e)
            if err is None:
                raise
            raise err from e
        loss = loss_fn(out, b) if loss_fn is not None else default_loss(out, b, n_in)
        loss.backward()
        n += 1
        for name, p in params.items():
            if p.grad is None:
                continue
            g = p.grad.detach().double().numpy()
            w = p.detach().double().numpy()
            gw[name] = gw.get(name, 0) + g * w
            gw_sq[name] = gw_sq.get(name, 0) + (g * w) ** 2
            fisher[name] = fisher.get(name, 0) + g**2
    return GradStats(gw, gw_sq, fisher, n)
