"""The data-free sparsity pass for weight arrays: magnitude / random masks on ``(name, array)``.

Pipeline position: the plan step of ``graphprune.sparsify`` for ONNX models
(:mod:`graphprune.api.sparsify`). The frontend lists the weight uses of the model (which
initializer a ``MatMul`` / ``Gemm`` / ``Conv`` reads as its weight, and along which axis it
reduces: ``graphprune.frontends.onnx.masks.weight_uses``) and reads the arrays; this pass views
each weight as ``(out, reduction)``, masks it with the same pattern code as the torch pass
(:mod:`graphprune.passes.sparsity.patterns`) and returns a
:class:`~graphprune.passes.sparsity.report.MaskSet`. The API records the masks on the IR and the
frontend writes them into a copy of the model.

The output head (the weight of the last use, in the order given: the graph's topological node
order) is excluded by default. Calibration-based methods need activations, which this pass does
not compute yet: they raise :class:`ConfigError` pointing at the torch path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.config import SparsityConfig
from graphprune.passes.sparsity.patterns import NM, check_mask, fits, select_global, select_mask
from graphprune.passes.sparsity.report import LayerSparsity, MaskSet, SparsityReport
from graphprune.passes.sparsity.targets import match_exclude

__all__ = ["ARRAY_METHODS", "WeightUse", "check_array_method", "compute_array_masks"]

ARRAY_METHODS = ("magnitude", "random")


class WeightUse(NamedTuple):
    """One op reading a weight: ``reduction_axis`` is 0 for a ``(K, N)`` matrix (MatMul, Gemm
    without transB), 1 for ``(N, K)`` and for convolutions ``(O, C/g, kh, kw)``."""

    name: str  # the weight's (initializer's) name
    node: str  # the op reading it
    op: str  # its type, e.g. "MatMul"
    reduction_axis: int


def check_array_method(method: str) -> None:
    """ConfigError unless ``method`` is one this pass computes without running the model."""
    if method not in ARRAY_METHODS:
        raise ConfigError(f"method={method!r} is not available for ONNX input yet (only "
                          f"{', '.join(ARRAY_METHODS)}): sparsify the torch model instead")


def _to2d(w: np.ndarray, red_axis: int) -> np.ndarray:
    if w.ndim == 2 and red_axis == 0:
        return w.T
    return w.reshape(w.shape[0], -1)


def _from2d(m2d: np.ndarray, shape, red_axis: int) -> np.ndarray:
    return m2d.T if len(shape) == 2 and red_axis == 0 else m2d.reshape(shape)


def compute_array_masks(weights: Mapping[str, np.ndarray],
                        uses: Iterable[tuple[str, str, str, int]], config: SparsityConfig,
                        exclude: list[str] | None = None) -> MaskSet:
    """Masks for the weights named in ``uses`` (4-tuples as :class:`WeightUse`), read from
    ``weights`` (only those not excluded are read). Nothing is written.

    Examples
    --------
    >>> from graphprune.passes.sparsity.config import validate_config
    >>> w = {"W": np.arange(16, dtype=np.float32).reshape(4, 4)}
    >>> cfg, _ = validate_config(pattern="2:4")
    >>> found = compute_array_masks(w, [("W", "mm", "MatMul", 0)], cfg, exclude=[])
    >>> found.masks["W"].numpy().astype(int)
    array([[0, 0, 0, 0],
           [0, 0, 0, 0],
           [1, 1, 1, 1],
           [1, 1, 1, 1]])
    """
    check_array_method(config.method)
    pat, uses = config.pattern, [WeightUse(*u) for u in uses]
    t0 = time.perf_counter()
    report = SparsityReport(config.method, str(pat), config.scope, config.sparsity, "none")
    head = uses[-1].name if uses else None
    axes: dict[str, int] = {}
    for use in uses:
        if axes.setdefault(use.name, use.reduction_axis) != use.reduction_axis:
            report.excluded[use.name] = "initializer used with two different reduction axes"
    gen = torch.Generator().manual_seed(config.seed)
    arrays, scores = {}, {}
    for name, axis in axes.items():
        if name in report.excluded:
            continue
        if exclude is None and name == head:
            report.excluded[name] = "output head (excluded by default; exclude=[] prunes it)"
            continue
        if exclude is not None and (hit := match_exclude(name, exclude)) is not None:
            report.excluded[name] = f"matches exclude {hit!r}"
            continue
        w = weights[name]
        if not np.issubdtype(w.dtype, np.floating) or w.ndim < 2:
            report.excluded[name] = f"not a float matrix (dtype {w.dtype}, ndim {w.ndim})"
            continue
        w2 = torch.from_numpy(np.array(_to2d(w, axis), copy=True))
        if (why := fits(pat, tuple(w2.shape))) is not None:
            report.excluded[name] = f"{why}: left dense (pattern {pat})"
            continue
        if not torch.isfinite(w2).all():
            raise ConfigError(f"initializer {name!r} holds NaN/inf: fix the model or exclude it")
        arrays[name] = w
        scores[name] = w2.abs().float() if config.method == "magnitude" else torch.rand(
            w2.shape, generator=gen)
    if not arrays:
        raise ConfigError("no ONNX initializer left to sparsify: " + "; ".join(
            f"{k}: {v}" for k, v in report.excluded.items()))
    if config.scope == "global":
        keeps = select_global(scores, pat, config.sparsity, config.min_keep)
    else:
        keeps = {k: select_mask(s, pat, config.sparsity, "layer") for k, s in scores.items()}
    masks = {}
    group = "N:M groups" if isinstance(pat, NM) else config.scope
    for name, w in arrays.items():
        keep = keeps[name]
        masks[name] = torch.from_numpy(np.ascontiguousarray(_from2d(keep.numpy(), w.shape,
                                                                    axes[name])))
        report.layers.append(LayerSparsity(name, tuple(w.shape), int(keep.sum()), keep.numel(),
                                           check_mask(keep, pat), group, None, 0.0))
    report.seconds = time.perf_counter() - t0
    return MaskSet(masks, {}, report)
