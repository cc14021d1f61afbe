"""Data-free sparsity (magnitude, random) on an ONNX ModelProto's weight initializers.

Targets are initializers used as the weight of ``MatMul`` (input 1, ``(K, N)``: reduction is
axis 0), ``Gemm`` (input B, ``(K, N)`` or ``(N, K)`` with ``transB=1``) and ``Conv`` (input W,
``(O, C/g, kh, kw)``: reduction ``C/g*kh*kw``). Each is viewed as ``(out, reduction)``, masked
with the same pattern code as the torch path, and written back into a copy of the model. The
output head (the last target in the graph's topological node order) is excluded by default.
Calibration-based methods need activations, which this path does not compute yet: they raise
:class:`ConfigError` pointing at the torch path.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from graphprune.ir.errors import ConfigError

from graphprune.passes.sparsity.patterns import NM, check_mask, fits, parse_pattern, select_global, select_mask
from graphprune.passes.sparsity.report import LayerSparsity, SparsityReport
from graphprune.passes.sparsity.targets import match_exclude

__all__ = ["sparsify_onnx"]

_SUPPORTED = ("magnitude", "random")


def _weight_slots(model):
    """(initializer name, node name, op, reduction axis) for each weight use, in node order."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            out.append((node.input[1], node.name or node.output[0], "MatMul", 0))
        elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            out.append((node.input[1], node.name or node.output[0], "Gemm", 1 if trans_b else 0))
        elif node.op_type == "Conv" and node.input[1] in inits:
            out.append((node.input[1], node.name or node.output[0], "Conv", 1))
    return out


def _to2d(w: np.ndarray, red_axis: int) -> np.ndarray:
    if w.ndim == 2 and red_axis == 0:
        return w.T
    return w.reshape(w.shape[0], -1)


def _from2d(m2d: np.ndarray, shape, red_axis: int) -> np.ndarray:
    return m2d.T if len(shape) == 2 and red_axis == 0 else m2d.reshape(shape)


def sparsify_onnx(model, sparsity=None, pattern="unstructured", method="magnitude", calib=None,
                  scope="layer", min_keep=0.0, exclude=None, seed=0):
    """ONNX counterpart of :func:`graphprune.passes.sparsity.sparsify.sparsify` (magnitude / random)."""
    import onnx
    from onnx import numpy_helper

    from graphprune.passes.sparsity.sparsify import SparsifyResult, _validate

    if method not in _SUPPORTED:
        raise ConfigError(f"method={method!r} is not available for ONNX input yet (only "
                          f"{', '.join(_SUPPORTED)}): sparsify the torch model instead")
    cfg, _ = _validate(sparsity, pattern, method, scope, min_keep, 128, 0.01, 1, seed, calib,
                       None, None)
    pat = parse_pattern(pattern)
    t0 = time.perf_counter()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    report = SparsityReport(method, str(pat), scope, cfg.sparsity, "none")
    inits = {i.name: i for i in work.graph.initializer}
    slots = _weight_slots(work)
    head = slots[-1][0] if slots else None
    axes: dict[str, int] = {}
    for name, node, op, axis in slots:
        if axes.setdefault(name, axis) != axis:
            report.excluded[name] = "initializer used with two different reduction axes"
    gen = torch.Generator().manual_seed(cfg.seed)
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
        w = numpy_helper.to_array(inits[name])
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
        scores[name] = w2.abs().float() if method == "magnitude" else torch.rand(
            w2.shape, generator=gen)
    if not arrays:
        raise ConfigError("no ONNX initializer left to sparsify: " + "; ".join(
            f"{k}: {v}" for k, v in report.excluded.items()))
    if scope == "global":
        keeps = select_global(scores, pat, cfg.sparsity, cfg.min_keep)
    else:
        keeps = {k: select_mask(s, pat, cfg.sparsity, "layer") for k, s in scores.items()}
    masks = {}
    for name, w in arrays.items():
        keep = keeps[name]
        m = _from2d(keep.numpy(), w.shape, axes[name])
        inits[name].CopyFrom(numpy_helper.from_array((w * m).astype(w.dtype), name))
        masks[name] = torch.from_numpy(np.ascontiguousarray(m))
        group = "N:M groups" if isinstance(pat, NM) else scope
        report.layers.append(LayerSparsity(name, tuple(w.shape), int(keep.sum()), keep.numel(),
                                           check_mask(keep, pat), group, None, 0.0))
    report.seconds = time.perf_counter() - t0
    return SparsifyResult(work, masks, report)
