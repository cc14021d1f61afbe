"""SmoothQuant scale migration (Xiao et al., ICML 2023) across a norm and the linears it feeds.

For linears ``y_i = x W_i^T`` that all read one norm's output ``x = n(h) * g + b``, a per-channel
factor ``s`` with ``x' = x / s`` and ``W_i' = W_i * s`` (columns) leaves every ``y_i`` unchanged in
float, and ``x / s`` is folded into the norm (``g / s``, ``b / s``), so the graph runs no extra op.
``s_j = max|x_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha)`` (paper eq. 4): alpha 0.5 moves half
of the activation outliers' range (in log scale) into the weights, which int8 per-channel weight
scales absorb better than per-tensor activation scales do.

Where it applies is read from the IR: the norm is a ``layer_norm`` op with a weight parameter
(slot 2, bias slot 3) or a ``mul`` by a 1-D parameter along the last axis (RMSNorm's ``g * x``),
and *every* consumer of its output is a ``linear`` reading it as the input (slot 0, weight layout
``oi``). Post-LN transformers (BERT) feed the residual add too: those norms are listed as not
smoothed, with the reason, and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.ir.graph import PruneGraph


@dataclass(frozen=True)
class SmoothPair:
    """A norm op whose output feeds only linears: ``scales`` are its per-channel parameters (the
    weight, and the bias if any), ``linears`` the weights of the linears reading it."""

    norm: str
    scales: tuple[str, ...]
    linears: tuple[str, ...]


def _norm_params(pg: PruneGraph, o: str) -> tuple[str, ...] | None:
    op = pg.op(o)
    ins = pg.op_inputs(o)
    if op.kind == "layer_norm":
        got = [pg.value(v).param for v in ins[2:4] if v is not None and pg.value(v).param]
        return tuple(got) if got else None
    if op.kind == "mul" and len(ins) == 2:
        params = [v for v in ins if v is not None and pg.value(v).param]
        acts = [v for v in ins if v is not None and not pg.value(v).param]
        if len(params) == 1 and len(acts) == 1:
            p, a = pg.value(params[0]), pg.value(acts[0])
            if p.shape is not None and len(p.shape) == 1 and a.shape and a.shape[-1] == p.shape[0]:
                return (p.param,)
    return None


def find_smooth_pairs(pg: PruneGraph) -> tuple[list[SmoothPair], dict[str, str]]:
    """Norms SmoothQuant can fold into, and for the others that feed a linear, why not."""
    pairs, skipped = [], {}
    for o in pg.ops():
        params = _norm_params(pg, o)
        if params is None:
            continue
        outs = pg.op_outputs(o)
        cons = [(c, slot) for v in outs for c, slot in pg.consumers(v)]
        lin = [(c, s) for c, s in cons if pg.op(c).kind == "linear" and s == 0
               and pg.op(c).attrs.get("w_layout", "oi") == "oi" and pg.param(c, 1)]
        if not lin:
            continue
        others = sorted({f"{c} ({pg.op(c).kind})" for c, s in cons if (c, s) not in lin})
        if others:
            skipped[o] = ("its output also feeds " + ", ".join(others[:3])
                          + ": scaling it would change those")
            continue
        weights = tuple(pg.value(pg.param(c, 1)).param for c, _ in lin)
        pairs.append(SmoothPair(o, params, weights))
    return pairs, skipped


def smooth_factors(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """Per-input-channel ``s`` (paper eq. 4); 1 where a channel is all zero in x or in W.

    >>> smooth_factors(np.array([4.0, 1.0]), [np.array([[1.0, 1.0]])], 0.5).tolist()
    [2.0, 1.0]
    """
    w_max = np.max([np.abs(w).max(axis=0) for w in weights], axis=0).astype(np.float64)
    a = np.asarray(act_max, np.float64)
    ok = (a > 0) & (w_max > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w_max[ok] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def migrate(pair: SmoothPair, arrays: dict[str, np.ndarray],
            s: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
    """New arrays for the pair's parameters: the norm's ``/ s``, the linears' columns ``* s``."""
    out = {p: (arrays[p] / s).astype(arrays[p].dtype) for p in pair.scales}
    out.update({w: (arrays[w] * s[None, :]).astype(arrays[w].dtype) for w in pair.linears})
    return out
