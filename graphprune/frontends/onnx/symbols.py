"""Symbolic sizes for ONNX captures: ``pg.dynamic_axes``, ``pg.static_axes``, ``Value.symbols``.

ONNX capture analyses a model at fixed sizes of its symbolic input dims (``dim_param``) and folds
its shape subgraphs (:mod:`~graphprune.frontends.onnx.shapes`), so onnx shape inference on the
original graph cannot say how an intermediate size follows a dim (the legacy exporter computes
``Reshape`` targets in the graph). Instead the model is folded and shape-inferred at more sizes
(*probes*: each dim one step away, and each pair of dims together) and every axis's size is fitted
as ``c + Σ a_d·d + Σ a_de·d·e`` with integer coefficients, which covers what exporters write for a
batch and a sequence (``17*batch``, ``seq + 1``, ``batch*seq`` after a flatten). An axis whose
sizes fit no such expression (``seq//2`` seen at two sizes) keeps its example size and is named in
``pg.static_axes`` when it is a graph output.

Runs at the end of :func:`~graphprune.frontends.onnx.capture.capture_onnx`, as the torch
frontend's :mod:`graphprune.frontends.torch.dynamic` does after ``torch.export``; the record has
the same form for both frontends, so reports and ``passes.cost.count(pg, at=...)`` read either.
"""

from __future__ import annotations

import itertools
import re
from fractions import Fraction

import onnx

from graphprune.frontends.onnx.files import infer_shapes
from graphprune.ir import PruneGraph
from graphprune.ir.graph import DynamicAxis

Shape = tuple[int | None, ...]


def probe_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Every tensor's inferred shape in ``model`` (a model with static inputs), by name."""
    inferred = infer_shapes(model)
    g = inferred.graph
    out: dict[str, Shape] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return out


def dim_name(dim_param: str) -> str:
    """The dim's name in size expressions: ``dim_param`` itself when it is an identifier (as
    exporters write ``batch``, ``seq``), else with the other characters replaced."""
    if dim_param.isidentifier():
        return dim_param
    name = re.sub(r"\W", "_", dim_param)
    return name if name.isidentifier() else f"d_{name}"


Terms = tuple[int, dict[str, int], dict[tuple[str, str], int]]


def fit_terms(base: int, sizes: dict[str, int], probes: list[tuple[dict[str, int], int | None]],
              ) -> Terms | None:  # fmt: skip
    """``(c, {d: a_d}, {(d, e): a_de})`` with ``size = c + Σ a_d·d + Σ a_de·d·e`` for an axis of
    size ``base`` at ``sizes`` and the probed sizes, or ``None`` when it fits no integer
    polynomial of degree one per dim (a size missing at a probe included)."""
    single: dict[str, Fraction] = {}
    cross: dict[tuple[str, str], Fraction] = {}
    at = {tuple(sorted(d for d in p if p[d] != sizes[d])): (p, n) for p, n in probes}
    for key, (p, n) in at.items():
        if n is None:
            return None
        if len(key) == 1:
            (d,) = key
            single[d] = Fraction(n - base, p[d] - sizes[d])
    for key, (p, n) in at.items():
        if len(key) == 2:
            d, e = key
            # s(d', e') - s(d', e) - s(d, e') + s(d, e) over the two steps: the d·e coefficient
            nd = base + single.get(d, 0) * (p[d] - sizes[d])
            ne = base + single.get(e, 0) * (p[e] - sizes[e])
            cross[key] = Fraction(n - nd - ne + base, (p[d] - sizes[d]) * (p[e] - sizes[e]))
    # single[d] is the slope in d at the analysed sizes of the other dims: remove their cross terms
    coef = dict(single)
    for (d, e), c in cross.items():
        coef[d] = coef.get(d, 0) - c * sizes[e]
        coef[e] = coef.get(e, 0) - c * sizes[d]
    const = base - sum(c * sizes[d] for d, c in coef.items()) - sum(
        c * sizes[d] * sizes[e] for (d, e), c in cross.items())
    if any(t.denominator != 1 for t in [*coef.values(), *cross.values(), const]):
        return None
    return (int(const), {d: int(c) for d, c in coef.items() if c},
            {k: int(c) for k, c in cross.items() if c})  # fmt: skip


def _fit(base: int, sizes: dict[str, int], probes: list[tuple[dict[str, int], int | None]],
         names: dict[str, str]) -> str | None:  # fmt: skip
    """The expression of an axis of size ``base`` at ``sizes`` and the probed sizes, or ``None``
    when it does not vary or fits no integer polynomial of degree one per dim."""
    terms = fit_terms(base, sizes, probes)
    if terms is None or not (terms[1] or terms[2]):
        return None
    const, coef, cross = terms
    parts = []
    for key, c in [*((names[d], c) for d, c in coef.items()),
                   *((f"{names[d]}*{names[e]}", c) for (d, e), c in cross.items())]:  # fmt: skip
        parts.append(key if c == 1 else f"{c}*{key}")
    if const:
        parts.append(str(const))
    return " + ".join(parts).replace("+ -", "- ")


def probe_sizes(sizes: dict[str, int], ranges: dict[str, tuple[int, int]]) -> list[dict[str, int]]:
    """The sizes to fold the model at besides ``sizes``: each dim one step away within its range
    (dims fixed by their range are left out), then each pair of those dims stepped together."""
    steps = {}
    for d, s in sizes.items():
        lo, hi = ranges[d]
        other = s + 1 if s + 1 <= hi else s - 1
        if lo <= other != s:
            steps[d] = other
    out = [{**sizes, d: o} for d, o in steps.items()]
    out += [{**sizes, d: steps[d], e: steps[e]} for d, e in itertools.combinations(steps, 2)]
    return out


def record_dynamic(pg: PruneGraph, dynamic, probes: list[tuple[dict[str, int], dict[str, Shape]]],
                   given: set[str]) -> None:  # fmt: skip
    """Fill ``pg.dynamic_axes``, ``pg.static_axes`` and each value's ``symbols`` from the
    analysed sizes (``dynamic``: :class:`~graphprune.frontends.onnx.shapes.DynamicDims`) and
    the ``probes`` (sizes → shapes by tensor name). ``given``: the dims ``dynamic_shapes`` named."""
    names = {d: dim_name(d) for d in dynamic.uses}
    varies = {d for p, _ in probes for d in p if p[d] != dynamic.sizes[d]}
    for d, uses in dynamic.uses.items():
        lo, hi = dynamic.ranges[d]
        for inp, axis in uses:
            if d in dynamic.static:
                pg.static_axes[f"{inp}[{axis}]"] = (
                    f"dim_param {d!r} falls back to static at its example size "
                    f"{dynamic.sizes[d]}: {dynamic.static[d]}")
                continue
            if d not in varies:
                how = "dynamic_shapes" if d in given else "its range"
                pg.static_axes[f"{inp}[{axis}]"] = (
                    f"dim_param {d!r} is fixed to {dynamic.sizes[d]} by {how} ({lo}, {hi}); give "
                    f"dynamic_shapes={{{d!r}: (min, max)}} with min < max to keep it dynamic")
                continue
            note = "" if d in given else (
                f"default range; pass dynamic_shapes={{{d!r}: (min, max)}} to set it")
            if names[d] != d:
                note = f"dim_param {d!r}" + (f"; {note}" if note else "")
            pg.dynamic_axes.append(DynamicAxis(inp, axis, names[d], lo, hi, dynamic.sizes[d], note))
    if not varies:
        return
    for v in pg.values():
        val = pg.value(v)
        if val.role == "param" or not val.shape:
            continue
        symbols = []
        for axis, base in enumerate(val.shape):
            seen = [(p, _axis(shapes.get(v), axis, len(val.shape))) for p, shapes in probes]
            symbols.append(_fit(base, dynamic.sizes, seen, names)
                           if all(n is not None for _, n in seen) else None)  # fmt: skip
        if any(s is not None for s in symbols):
            val.symbols = tuple(symbols)
    for v in pg.outputs:
        val = pg.value(v)
        for axis, base in enumerate(val.shape or ()):
            sized = [_axis(s.get(v), axis, len(val.shape)) for _, s in probes]
            if any(n != base for n in sized) and not (val.symbols and val.symbols[axis]):
                pg.static_axes[f"{v}[{axis}]"] = (
                    f"its size {base} follows the dynamic dims in a way graphprune cannot write as "
                    f"an expression (sizes {sized} at the probed dims); costs use {base}")


def _axis(shape: Shape | None, axis: int, rank: int) -> int | None:
    if shape is None or len(shape) != rank:
        return None
    return shape[axis]
