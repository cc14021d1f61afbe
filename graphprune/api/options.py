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

from collections.abc import Iterable, Mapping
from typing import Any

from graphprune.ir.checks import check_flag, check_integer, check_number
from graphprune.ir.errors import ConfigError
from graphprune.passes.prune.channels import check_ranges

__all__ = ["check_iterative_options", "check_prune_options", "check_sparsify_options"]


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
    check_integer("drop_blocks", drop_blocks, 0, example=2)
    targeted = target_macs is not None or target_params is not None or bool(drop_blocks)
    if ratio is None and not targeted:
        raise ConfigError("ratio=None: pass the fraction of prunable channels to remove, a number "
                          "in [0, 1) such as ratio=0.5, or give target_macs= / target_params=")
    if ratios is not None and not isinstance(ratios, Mapping):
        raise ConfigError(f"ratios={ratios!r}: pass a dict {{name glob: ratio}}, e.g. "
                          "ratios={'layer1.*': 0.3}")  # fmt: skip
    check_ranges(ratio=ratio, target_macs=target_macs, target_params=target_params,
                 min_keep=min_keep, round_to=round_to, ratios=ratios)
    check_integer("seed", seed, None, example=0)
    scores_ok = bool(drop_blocks) and isinstance(criterion, Mapping)  # {block name: score}
    if not (isinstance(criterion, str) or callable(criterion) or scores_ok):
        raise ConfigError(f"criterion={criterion!r} ({type(criterion).__name__}): pass a name such "
                          "as 'l2' or 'taylor', or a callable fn(ctx, group) -> scores")  # fmt: skip
    if not isinstance(scope, str):
        raise ConfigError(f"scope={scope!r}: use 'local' or 'global'")
    _globs("ignore", ignore)
    check_flag("heads", heads)
    check_flag("inplace", inplace)
    check_flag("uniform", uniform, none_ok=True)
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
    check_number("ratio", ratio, 0.0, 1.0)
    check_integer("steps", steps, 1, example=3)
    if schedule not in ("linear", "agp"):
        raise ConfigError(f"schedule={schedule!r}: use 'linear' or 'agp'")
    _callable("fine_tune", fine_tune, "fine_tune(model, step) -> model or None")
    for key in ("ratio", "target_macs", "target_params", "drop_blocks"):
        if key in prune_kwargs:
            raise ConfigError(f"prune_iteratively sets each step's ratio itself: drop {key}=")
    check_prune_options(**prune_kwargs)


def check_sparsify_options(*, seed: Any = 0, inplace: Any = False, **_: Any) -> None:
    """What :func:`graphprune.passes.sparsity.config.validate_config` does not check."""
    check_integer("seed", seed, None, example=0)
    check_flag("inplace", inplace)
