"""What a sparsity pass is asked to do: :class:`SparsityConfig`, checked by :func:`validate_config`.

Both mask passes (:mod:`graphprune.passes.sparsity.sparsify` for torch modules,
:mod:`graphprune.passes.sparsity.weight_arrays` for weight arrays such as ONNX initializers)
take a validated config, so every option is checked once, here, before anything is computed.
Every mistake raises :class:`~graphprune.ir.errors.ConfigError` naming the option and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.methods import ACTIVATION_METHODS, LOSS_METHODS, METHODS
from graphprune.passes.sparsity.patterns import NM, Block, Pattern, Unstructured, parse_pattern

__all__ = ["SparsityConfig", "validate_config", "validate_exclude"]


@dataclass(frozen=True)
class SparsityConfig:
    """Validated options of one sparsity pass (see :func:`graphprune.api.sparsify.sparsify`)."""

    pattern: Pattern
    sparsity: float
    method: str
    scope: str
    min_keep: float
    blocksize: int
    percdamp: float
    iterations: int
    seed: int
    allocation: str = "uniform"
    refine: str | None = None
    update: str | None = None


def _validate_extras(cfg: SparsityConfig) -> None:
    """OWL, DSnoT and the OBS update only make sense on top of the calibrated per-layer methods."""
    if cfg.allocation not in ("uniform", "owl"):
        raise ConfigError(f"allocation={cfg.allocation!r}: use 'uniform' or 'owl'")
    if cfg.refine not in (None, "dsnot"):
        raise ConfigError(f"refine={cfg.refine!r}: use None or 'dsnot'")
    if cfg.update not in (None, "obs"):
        raise ConfigError(f"update={cfg.update!r}: use None or 'obs' (SparseGPT's reconstruction "
                          "of the kept weights)")
    if cfg.allocation == "owl" and not (cfg.method in ("wanda", "sparsegpt")
                                        and cfg.scope == "layer"
                                        and isinstance(cfg.pattern, Unstructured)):
        raise ConfigError("allocation='owl' sets per-layer unstructured ratios: it needs "
                          "method='wanda' or 'sparsegpt', scope='layer', pattern='unstructured'")
    if cfg.refine == "dsnot" and not (cfg.method == "wanda" and cfg.scope == "layer"
                                      and isinstance(cfg.pattern, Unstructured)):
        raise ConfigError("refine='dsnot' swaps weights within each output row: it needs "
                          "method='wanda', scope='layer', pattern='unstructured'")
    if cfg.update == "obs" and not (cfg.method in ("wanda", "obd", "magnitude")
                                    and cfg.scope == "layer"):
        raise ConfigError("update='obs' reconstructs the kept weights of a mask from the layer "
                          "Hessian: it needs method='wanda', 'obd' or 'magnitude' with "
                          "scope='layer' and calib (sparsegpt already updates its weights)")


def _validate_sparsity(sparsity: Any, pat: Pattern) -> float:
    if isinstance(pat, NM):
        implied = pat.sparsity
        if sparsity is not None and not (isinstance(sparsity, (int, float))
                                         and abs(sparsity - implied) < 1e-9):
            raise ConfigError(f"sparsity={sparsity!r} contradicts pattern='{pat}', which fixes "
                              f"sparsity at {implied:g}; leave sparsity=None")
        sparsity = implied
    elif sparsity is None:
        sparsity = 0.5
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
            0.0 <= sparsity < 1.0):
        raise ConfigError(f"sparsity={sparsity!r} must be a number in [0, 1), e.g. 0.5")
    return float(sparsity)


def validate_config(*, sparsity=None, pattern="unstructured", method="magnitude", scope="layer",
                    min_keep=0.0, blocksize=128, percdamp=0.01, iterations=100, seed=0,
                    calib=None, example_inputs=None, loss_fn=None, allocation="uniform",
                    refine=None, update=None) -> tuple[SparsityConfig, list | None]:
    """Check the options of a sparsity pass; return the config and ``calib`` as a list.

    ``calib`` comes back as a list of batches (a single tensor or dict becomes one batch; an
    empty iterable becomes ``None``). ``example_inputs`` and ``loss_fn`` are only checked
    (SynFlow needs inputs; a loss must be callable), not kept.

    Examples
    --------
    >>> cfg, calib = validate_config(pattern="2:4")
    >>> cfg.sparsity, calib
    (0.5, None)
    """
    pat = parse_pattern(pattern)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")
    sparsity = _validate_sparsity(sparsity, pat)
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope={scope!r}: use 'layer' or 'global'")
    if scope == "global" and isinstance(pat, NM):
        raise ConfigError("scope='global' has no meaning for an N:M pattern: use scope='layer'")
    if method == "sparsegpt" and (scope == "global" or isinstance(pat, Block)):
        raise ConfigError("method='sparsegpt' reconstructs layer by layer: it needs "
                          "scope='layer' and pattern 'unstructured' or 'N:M'")
    if not (isinstance(min_keep, (int, float)) and 0.0 <= min_keep <= 1.0):
        raise ConfigError(f"min_keep={min_keep!r} must be a fraction in [0, 1]")
    if not (isinstance(blocksize, int) and blocksize >= 1):
        raise ConfigError(f"blocksize={blocksize!r} must be a positive int (default 128)")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ConfigError(f"percdamp={percdamp!r} must be a finite number >= 0 (default 0.01)")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ConfigError(f"iterations={iterations!r} must be a positive int (SynFlow rounds)")
    if calib is not None:
        calib = [calib] if isinstance(calib, (torch.Tensor, dict)) else list(calib)
        if not calib:
            calib = None
    if (method in ACTIVATION_METHODS + LOSS_METHODS or update is not None) and calib is None:
        what = f"method={method!r}" if update is None else f"update={update!r}"
        raise ConfigError(f"{what} needs calibration data: pass calib=[batch, ...] "
                          "(each batch a tensor, tuple of args or dict of kwargs)")
    if method == "synflow" and example_inputs is None:
        raise ConfigError("method='synflow' needs example_inputs (only their shape is used)")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError("loss_fn must be callable(model, batch) -> scalar tensor")
    cfg = SparsityConfig(pat, sparsity, method, scope, float(min_keep), blocksize,
                         float(percdamp), iterations, int(seed), allocation, refine, update)
    _validate_extras(cfg)
    return cfg, calib


def validate_exclude(exclude: Any) -> list[str] | None:
    """``exclude`` as given (``None`` or a list of names/globs); anything else is a ConfigError."""
    if exclude is None:
        return None
    try:
        names = None if isinstance(exclude, str) else list(exclude)
    except TypeError:
        names = None
    if names is None or not all(isinstance(e, str) for e in names):
        raise ConfigError("exclude must be a list of module names or globs, e.g. ['lm_head']")
    return names
