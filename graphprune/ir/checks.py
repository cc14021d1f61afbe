"""Type and range checks of user options, shared by the API's up-front checks and the passes'
own configs, so a value is judged by one rule and named the same way wherever it arrives.

Each raises :class:`~graphprune.ir.errors.ConfigError` naming the option, the value given and what
to pass: a wrong type (``ratio="abc"``), ``None`` where a number is needed, NaN or a value out of
range, never a ``TypeError`` from deep inside a pass.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from graphprune.ir.errors import ConfigError

__all__ = ["check_flag", "check_integer", "check_number"]


def check_number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = True, example: str = "0.5", none_ok: bool = False) -> None:  # fmt: skip
    """``value`` is a finite real (not a bool) in the interval ``lo..hi`` (ends as told).

    Examples
    --------
    >>> check_number("ratio", 0.3, 0.0, 1.0)
    >>> check_number("ratio", 1.0, 0.0, 1.0)
    Traceback (most recent call last):
    ...
    graphprune.ir.errors.ConfigError: ratio=1.0 is outside [0, 1): pass a number in [0, 1), e.g. ratio=0.5
    """
    if value is None and none_ok:
        return
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    want = f"a number in {left}{lo:g}, {hi:g}{right}, e.g. {name}={example}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} ({type(value).__name__}): pass {want}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name}={value!r} is not finite: pass {want}")
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        raise ConfigError(f"{name}={value!r} is outside {left}{lo:g}, {hi:g}{right}: pass {want}")


def check_integer(name: str, value: Any, minimum: int | None, *, example: int = 1,
                  none_ok: bool = False) -> None:  # fmt: skip
    """``value`` is an integer (not a bool), at least ``minimum`` when one is given."""
    if value is None and none_ok:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):  # fmt: skip
        floor = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name}={value!r} ({type(value).__name__}): pass an integer{floor}, "
                          f"e.g. {name}={example}")  # fmt: skip


def check_flag(name: str, value: Any, *, none_ok: bool = False) -> None:
    """``value`` is ``True`` or ``False`` (or ``None`` where that means "decide for me")."""
    if value is None and none_ok:
        return
    if not isinstance(value, bool):
        extra = " or None" if none_ok else ""
        raise ConfigError(f"{name}={value!r} ({type(value).__name__}): pass True or False{extra}")
