"""Checks of the options of ``gp.prune``, ``gp.prune_iteratively`` and ``gp.sparsify``.

Run first thing in each entry point, before a capture or any other work: a wrong type (``ratio="abc"``),
``None`` where a number is needed, NaN or a value out of range is a
:class:`~graphprune.ir.errors.ConfigError` naming the option, the value given and what to pass,
never a ``TypeError`` from deep inside a pass. Range rules that depend on several options
(``target_macs`` with ``target_params``, criteria that need ``calib``) stay with the passes'
own configs (:class:`graphprune.passes.prune.channels.PruneConfig`,
:func:`graphprune.passes.sparsity.config.validate_config`), which run after these checks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from graphprune.ir.errors import ConfigError

__all__ = ["check_iterative_options", "check_prune_options", "check_sparsify_options"]


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = True, example: str = "0.5", none_ok: bool = False) -> None:  # fmt: skip
    """``value`` is a finite real (not a bool) in the interval ``lo..hi`` (ends as told)."""
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


def _integer(name: str, value: Any, minimum: int | None, *, example: int = 1,
             none_ok: bool = False) -> None:  # fmt: skip
    if value is None and none_ok:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):  # fmt: skip
        floor = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name}={value!r} ({type(value).__name__}): pass an integer{floor}, "
                          f"e.g. {name}={example}")  # fmt: skip


def _flag(name: str, value: Any, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, bool):
        extra = " or None" if none_ok else ""
        raise ConfigError(f"{name}={value!r} ({type(value).__name__}): pass True or False{extra}")


def _globs(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"{name}={value!r}: pass a list of name globs, e.g. {name}=['fc*']")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{name} holds {bad[0]!r} ({type(bad[0]).__name__}): every entry is a "
                          f"parameter/module name glob (a string)")  # fmt: skip


def _callable(name: str, value: Any, what: str) -> None:
    if value is not None and not callable(value):
        raise ConfigError(f"{name}={value!r} is not callable: pass {what}")


def check_prune_options(*, ratio: Any = 0.5, criterion: Any = "l2", scope: Any = "local",
                        target_macs: Any = None, target_params: Any = None, ratios: Any = None,
                        ignore: Any = None, round_to: Any = None, min_keep: Any = 0.1,
                        heads: Any = True, calib: Any = None, loss_fn: Any = None,
                        inplace: Any = False, seed: Any = 0, drop_blocks: Any = 0,
                        depth_unit: Any = "branch", uniform: Any = None, **_: Any) -> None:  # fmt: skip
    """Types and ranges of :func:`graphprune.prune`'s options (see its docstring).

    ``ratio=None`` is accepted only where it is not used: with ``target_macs``,
    ``target_params`` or ``drop_blocks``.

    Examples
    --------
    >>> check_prune_options(ratio=0.3, round_to=8)
    >>> check_prune_options(ratio="abc")
    Traceback (most recent call last):
    ...
    graphprune.ir.errors.ConfigError: ratio='abc' (str): pass a number in [0, 1), e.g. ratio=0.5
    """
    _integer("drop_blocks", drop_blocks, 0, example=2)
    targeted = target_macs is not None or target_params is not None or bool(drop_blocks)
    if ratio is None and not targeted:
        raise ConfigError("ratio=None: pass the fraction of prunable channels to remove, a number "
                          "in [0, 1) such as ratio=0.5, or give target_macs= / target_params=")
    _number("ratio", ratio, 0.0, 1.0, none_ok=True)
    _number("target_macs", target_macs, 0.0, 1.0, lo_open=True, hi_open=False, none_ok=True)
    _number("target_params", target_params, 0.0, 1.0, lo_open=True, hi_open=False, none_ok=True)
    _number("min_keep", min_keep, 0.0, 1.0, hi_open=False, example="0.1")
    _integer("round_to", round_to, 1, example=8, none_ok=True)
    _integer("seed", seed, None, example=0)
    scores_ok = bool(drop_blocks) and isinstance(criterion, Mapping)  # {block name: score}
    if not (isinstance(criterion, str) or callable(criterion) or scores_ok):
        raise ConfigError(f"criterion={criterion!r} ({type(criterion).__name__}): pass a name such "
                          "as 'l2' or 'taylor', or a callable fn(ctx, group) -> scores")  # fmt: skip
    if not isinstance(scope, str):
        raise ConfigError(f"scope={scope!r}: use 'local' or 'global'")
    if ratios is not None:
        if not isinstance(ratios, Mapping):
            raise ConfigError(f"ratios={ratios!r}: pass a dict {{name glob: ratio}}, e.g. "
                              "ratios={'layer1.*': 0.3}")  # fmt: skip
        for pat, r in ratios.items():
            if not isinstance(pat, str):
                raise ConfigError(f"ratios key {pat!r} is not a name glob (a string)")
            _number(f"ratios[{pat!r}]", r, 0.0, 1.0, example="0.3")
    _globs("ignore", ignore)
    _flag("heads", heads)
    _flag("inplace", inplace)
    _flag("uniform", uniform, none_ok=True)
    if depth_unit not in ("branch", "layer"):
        raise ConfigError(f"depth_unit={depth_unit!r}: use 'branch' or 'layer'")
    _callable("loss_fn", loss_fn, "loss_fn(output, batch) -> scalar tensor")
    if calib is not None and (isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable)):
        raise ConfigError(f"calib={type(calib).__name__}: pass a list (or any iterable) of "
                          "batches, each a tuple of input tensors like example_inputs")  # fmt: skip


def check_iterative_options(ratio: Any, steps: Any, schedule: Any, fine_tune: Any,
                            prune_kwargs: dict[str, Any]) -> None:  # fmt: skip
    """:func:`graphprune.prune_iteratively`'s own options, then those it passes to ``prune``."""
    if ratio is None:
        raise ConfigError("ratio=None: pass the final fraction of prunable channels to remove, a "
                          "number in [0, 1) such as ratio=0.5")  # fmt: skip
    _number("ratio", ratio, 0.0, 1.0)
    _integer("steps", steps, 1, example=3)
    if schedule not in ("linear", "agp"):
        raise ConfigError(f"schedule={schedule!r}: use 'linear' or 'agp'")
    _callable("fine_tune", fine_tune, "fine_tune(model, step) -> model or None")
    for key in ("ratio", "target_macs", "target_params", "drop_blocks"):
        if key in prune_kwargs:
            raise ConfigError(f"prune_iteratively sets each step's ratio itself: drop {key}=")
    check_prune_options(**prune_kwargs)


def check_sparsify_options(*, seed: Any = 0, inplace: Any = False, **_: Any) -> None:
    """What :func:`graphprune.passes.sparsity.config.validate_config` does not check."""
    _integer("seed", seed, None, example=0)
    _flag("inplace", inplace)
