"""Activation observers: statistics of one layer's input over the calibration batches.

A frontend feeds each layer input as 2-D rows ``(tokens, channels)`` (im2col rows for convs,
padding tokens left out) to :meth:`ActObserver.add`. Kept per layer:

- the per-channel ``max |x_j|`` (SmoothQuant's activation range, Xiao et al. 2023, eq. 4),
- the global ``max |x|`` (the min-max observer's symmetric range),
- a strided subsample of ``|x|`` (at most ``_SAMPLE_VALUES``) for the percentile observer: exact
  percentiles would need every value; a subsample of ~1M values fixes the 99.99th percentile to
  within a few of the largest ~100 values, which is all that choice of clip needs,
- up to ``_SAMPLE_ROWS`` rows, to measure the error quantizing the layer adds (and, for the
  ``mse`` observer, to choose the clipping range that minimises it).

Non-finite inputs raise :class:`~graphprune.ir.errors.ConfigError` naming the layer.
"""

from __future__ import annotations

import numpy as np

from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import QMAX

_SAMPLE_VALUES = 1 << 20
_SAMPLE_ROWS = 256


class ActObserver:
    """Statistics of one layer's input; :meth:`scale` gives the static int8 scale."""

    def __init__(self, name: str):
        self.name = name
        self.rows = 0
        self.chan_max: np.ndarray | None = None
        self.abs_values: list[np.ndarray] = []
        self.samples: list[np.ndarray] = []
        self._kept_values = 0

    def add(self, x2d: np.ndarray) -> None:
        x = np.asarray(x2d, np.float32)
        if x.size == 0:
            return
        a = np.abs(x)
        cmax = a.max(axis=0)
        if not np.isfinite(cmax).all():
            raise ConfigError(f"calibration: input of layer {self.name!r} holds NaN/inf; check "
                              "calib batches and the layers before it (or exclude it)")
        self.chan_max = cmax if self.chan_max is None else np.maximum(self.chan_max, cmax)
        self.rows += x.shape[0]
        if self._kept_values < _SAMPLE_VALUES:
            flat = a.reshape(-1)
            step = max(1, flat.size // (_SAMPLE_VALUES // 8))
            part = flat[::step][: _SAMPLE_VALUES - self._kept_values].copy()
            self.abs_values.append(part)
            self._kept_values += part.size
        kept = sum(s.shape[0] for s in self.samples)
        if kept < _SAMPLE_ROWS:
            step = max(1, x.shape[0] // (_SAMPLE_ROWS // 4))
            self.samples.append(x[::step][: _SAMPLE_ROWS - kept].copy())

    @property
    def seen(self) -> bool:
        return self.chan_max is not None

    def absmax(self) -> float:
        return float(self.chan_max.max())

    def scale(self, observer: str, percentile: float) -> float:
        """Symmetric per-tensor int8 scale: ``range / 127`` (range > 0). ``mse`` is chosen by
        :func:`graphprune.passes.quant.specs.choose_specs` from :meth:`candidate_scales`."""
        if observer == "percentile":
            rng = float(np.percentile(np.concatenate(self.abs_values), percentile))
        else:
            rng = self.absmax()
        return max(rng, 1e-8) / QMAX

    def candidate_scales(self) -> list[float]:
        """Clipping ranges the ``mse`` observer tries: the max, fractions of it, and high
        percentiles of ``|x|`` (clipping a few outliers buys resolution for every other value)."""
        amax = self.absmax()
        vals = np.concatenate(self.abs_values)
        rngs = [amax * f for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)]
        rngs += [float(np.percentile(vals, p)) for p in (99.0, 99.9, 99.99, 99.999)]
        return sorted({max(r, 1e-8) / QMAX for r in rngs}, reverse=True)

    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples)
