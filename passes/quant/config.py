"""Options of ``graphprune.quantize``, checked before any work: a bad value is a
:class:`~graphprune.ir.errors.ConfigError` naming the option and what to pass."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import SCHEMES

OBSERVERS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantConfig:
    """Validated options (see :func:`graphprune.quantize` for their meaning)."""

    scheme: str = "w8a8_dynamic"
    observer: str = "minmax"
    percentile: float = 99.99
    smooth: float | None = None  # SmoothQuant alpha, None = no migration

    @property
    def static(self) -> bool:
        return self.scheme == "w8a8_static"

    @property
    def quantizes_inputs(self) -> bool:
        return self.scheme != "w8"


def _real(name: str, value: Any, lo: float, hi: float, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: pass a finite number in ({lo:g}, {hi:g}], "
                          f"e.g. {name}={example}")  # fmt: skip
    if not lo < float(value) <= hi:
        raise ConfigError(f"{name}={value!r} is outside ({lo:g}, {hi:g}]: pass e.g. "
                          f"{name}={example}")
    return float(value)


def validate_quant_config(scheme: Any = "w8a8_dynamic", observer: Any = "minmax",
                          percentile: Any = None, smooth: Any = None, calib: Any = None,
                          exclude: Any = None) -> QuantConfig:  # fmt: skip
    """A :class:`QuantConfig` from user options, or a ConfigError naming the bad one.

    ``percentile`` alone implies ``observer="percentile"``. ``w8a8_static`` and ``smooth`` need
    ``calib`` (activations are observed on it).

    >>> validate_quant_config("w8a8_static", percentile=99.9, calib=[0]).observer
    'percentile'
    >>> validate_quant_config("int4")
    Traceback (most recent call last):
    ...
    graphprune.ir.errors.ConfigError: scheme='int4': use one of 'w8', 'w8a8_dynamic', 'w8a8_static'
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r}: use one of " + ", ".join(map(repr, SCHEMES)))
    if percentile is not None and observer == "minmax":
        observer = "percentile"
    if observer not in OBSERVERS:
        raise ConfigError(f"observer={observer!r}: use 'minmax', 'percentile' or 'mse'")
    pct = 99.99 if percentile is None else _real("percentile", percentile, 50.0, 100.0, "99.99")
    alpha = None if smooth is None else _real("smooth", smooth, 0.0, 1.0, "0.5")
    if alpha == 1.0:
        raise ConfigError("smooth=1.0 moves all of the activation range into the weights; pass "
                          "an alpha in (0, 1), e.g. smooth=0.5")  # fmt: skip
    if calib is not None and (isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable)):
        raise ConfigError(f"calib={type(calib).__name__}: pass a list of batches (each a tensor, "
                          "a tuple of args or a dict of kwargs, like example inputs)")
    needs = "w8a8_static" if scheme == "w8a8_static" else ("smooth" if alpha else None)
    if needs and not calib:
        raise ConfigError(f"{needs} observes activations: pass calib=[batch, ...] (a few "
                          "representative input batches)")
    if observer != "minmax" and scheme != "w8a8_static":
        raise ConfigError(f"observer/percentile set the static activation scale: they need "
                          f"scheme='w8a8_static' (scheme is {scheme!r})")
    if exclude is not None and (isinstance(exclude, str) or not isinstance(exclude, Iterable)
                                or not all(isinstance(e, str) for e in exclude)):  # fmt: skip
        raise ConfigError(f"exclude={exclude!r}: pass a list of layer names or globs, "
                          "e.g. exclude=['lm_head']")
    return QuantConfig(scheme, observer, pct, alpha)
