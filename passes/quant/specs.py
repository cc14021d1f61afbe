"""Per-layer :class:`~graphprune.ir.quant.QuantSpec` records and the error each layer adds.

Input: :class:`QuantTarget` records (a frontend-neutral view of each weight to quantize: its
array in its own layout and output-channel axis) and the :class:`ActObserver` of each layer's
input. Weight scales are per output channel, symmetric (``max|W_c| / 127``); masked (zero)
weights stay zero. The error report measures each layer alone on calibration rows of its float
input, so a large number points at the layer itself, not at error accumulated before it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from graphprune.passes.quant.config import QuantConfig
from graphprune.passes.quant.observers import ActObserver
from graphprune.passes.quant.report import LayerQuant, QuantReport

from graphprune.ir.quant import QuantSpec, fake_quantize, fake_quantize_act, weight_scales


@dataclass
class QuantTarget:
    """One weight to quantize. ``weight`` is in the model's layout; ``axis`` its output-channel
    axis; moving ``axis`` first and flattening the rest gives the ``(out, reduction)`` matrix the
    layer's 2-D input rows multiply (im2col order for convs). ``per_token``: dynamic activation
    scales per row (linear layers) or per tensor (convs). ``groups > 1`` (grouped convs): the
    2-D view does not hold, so no error is measured."""

    layer: str
    param: str
    weight: np.ndarray
    axis: int
    per_token: bool = True
    groups: int = 1


def layer_error(t: QuantTarget, spec: QuantSpec, x: np.ndarray) -> float:
    """``||fq(x) fq(W)^T - x W^T|| / ||x W^T||`` on rows ``x`` of the layer's float input."""
    w2d = np.moveaxis(np.asarray(t.weight, np.float32), t.axis, 0).reshape(
        t.weight.shape[t.axis], -1)
    wq = np.moveaxis(fake_quantize(t.weight, spec), t.axis, 0).reshape(w2d.shape)
    xq = fake_quantize_act(x, spec.scheme, spec.act_scale, t.per_token)
    y, yq = x @ w2d.T, xq @ wq.T  # float32: the error measured is ~1e-2, far above fp32 rounding
    den = np.linalg.norm(y)
    return float(np.linalg.norm(yq - y) / den) if den > 0 else 0.0


def choose_specs(targets: list[QuantTarget], observers: dict[str, ActObserver],
                 cfg: QuantConfig, report: QuantReport,
                 smoothed: set[str] = frozenset()) -> dict[str, QuantSpec]:  # fmt: skip
    """A spec per target's weight (keyed by ``param``); each layer's line goes into ``report``.

    A ``w8a8_static`` layer no calibration batch reached has no activation range: it is left in
    float and listed in ``report.excluded``.
    """
    specs: dict[str, QuantSpec] = {}
    for t in targets:
        obs = observers.get(t.layer)
        seen = obs is not None and obs.seen
        act = None
        if cfg.static:
            if not seen:
                report.excluded[t.layer] = ("w8a8_static: no calibration batch ran this layer, so "
                                            "its input has no range; left in float")
                continue
            act = obs.scale(cfg.observer, cfg.percentile)
        s = weight_scales(t.weight, t.axis)
        if cfg.observer == "mse" and t.groups == 1:
            # The range whose quantized layer output is closest to the float one on the
            # calibration rows (the error the report states), as in TensorRT's/ORT's entropy and
            # MSE calibrators, but measured on the layer's output rather than its input.
            x = obs.sample()
            act = min(obs.candidate_scales(),
                      key=lambda a: layer_error(t, QuantSpec(cfg.scheme, s, t.axis, a), x))
        spec = QuantSpec(cfg.scheme, s, t.axis, act)
        err = layer_error(t, spec, obs.sample()) if seen and t.groups == 1 else None
        spec = replace(spec, rel_error=err)  # what gp.compile(int8_tolerance=) reads
        specs[t.param] = spec
        report.layers.append(LayerQuant(t.layer, t.param, cfg.scheme, int(s.size),
                                        float(s.min()), float(s.max()), act, err,
                                        t.param in smoothed))  # fmt: skip
    return specs
