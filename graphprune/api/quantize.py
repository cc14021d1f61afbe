"""``gp.quantize``: INT8 quantization recorded on the IR and written back for evaluation.

capture (or the prior result's graph) → SmoothQuant migration where the IR says it is exact
(:mod:`graphprune.passes.quant.smooth`, optional) → activation observers on the calibration
batches → per-channel weight scales and per-layer errors (:mod:`graphprune.passes.quant.specs`)
→ ``graph.quant`` → write-back: a torch module with fake-quantized weights and inputs
(:mod:`graphprune.frontends.torch.fake_quant`) or a QDQ ONNX model
(:mod:`graphprune.frontends.onnx.qdq`). Codegen reads ``graph.quant`` (``gp.compile(res)``).

Runs after ``gp.prune`` / ``gp.sparsify``: given their result, the masks are kept (zeros quantize
to 0) and recorded on the returned graph. The input model is never mutated unless ``inplace``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphprune import frontends
from graphprune.frontends.onnx import qdq
from graphprune.frontends.onnx.masks import weight_uses
from graphprune.frontends.torch import fake_quant, hf
from graphprune.ir import PruneGraph
from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import QuantSpec
from graphprune.passes.quant.calibrate import observe_torch
from graphprune.passes.quant.config import QuantConfig, validate_quant_config
from graphprune.passes.quant.observers import ActObserver
from graphprune.passes.quant.report import QuantReport
from graphprune.passes.quant.smooth import find_smooth_pairs, migrate, smooth_factors
from graphprune.passes.quant.specs import QuantTarget, choose_specs
from graphprune.passes.sparsity.targets import find_head, find_targets, match_exclude

__all__ = ["QuantizeResult", "quantize"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: ``model`` (fake-quantized torch module or QDQ ONNX
    ``ModelProto``), ``graph`` (``graph.quant`` holds the specs, ``graph.masks`` a prior
    sparsify's masks; ``None`` when the model could not be captured, see ``report.notes``) and
    ``report`` (scales and per-layer errors)."""

    model: Any
    graph: PruneGraph | None
    report: QuantReport
    specs: dict[str, QuantSpec]
    source: Any = None  # ONNX: the float model the QDQ one was written from

    def float_model(self) -> Any:
        """The float model codegen compiles with ``graph.quant`` (``gp.compile(...,
        graph=res.graph)``): torch, a copy of ``model`` without the input fake-quantization
        (weights on the int8 grid, smoothing folded in); ONNX, the model before Q/DQ."""
        if self.source is not None:
            return self.source
        return fake_quant.remove_input_quant(self.model)


def quantize(model, example_inputs=None, scheme="w8a8_dynamic", calib=None, smooth=None,
             percentile=None, observer="minmax", exclude=None, inplace=False,
             *, graph: PruneGraph | None = None) -> QuantizeResult:  # fmt: skip
    """INT8-quantize the linear and conv layers: per-output-channel symmetric int8 weights and,
    for W8A8, int8 inputs.

    Parameters
    ----------
    model : nn.Module, onnx.ModelProto, path of a .onnx file, or a gp.prune / gp.sparsify result
        A result's model is quantized and a sparsify result's masks are kept on the graph.
    example_inputs : tensor, tuple or dict, optional
        One input batch (capture, finding the output head). Default: the first ``calib`` batch.
    scheme : {"w8a8_dynamic", "w8a8_static", "w8"}
        ``w8``: weights only. ``w8a8_dynamic``: inputs quantized per token with scales taken at
        run time. ``w8a8_static``: one input scale per layer from ``calib``.
    calib : list of batches, optional
        Needed by ``w8a8_static`` and ``smooth``; with any scheme it gives the error report.
    smooth : float in (0, 1), optional
        SmoothQuant's migration strength alpha (0.5 in the paper) for linears fed only by a norm.
    percentile, observer : the static input range: ``"minmax"`` (default), the ``percentile``
        of ``|x|`` (e.g. 99.99; giving it selects the percentile observer), or ``"mse"``: the
        clipping range (max, fractions of it, high percentiles) whose quantized layer output is
        closest to the float one on the calibration rows.
    exclude : list of str, optional
        Layer names or globs left in float. ``None`` leaves the output head in float (as
        SmoothQuant and LLM.int8 do); ``[]`` quantizes it too.
    inplace : bool
        Quantize the torch model given instead of a copy.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(4, 8)
    >>> res = quantize(net, x, scheme="w8a8_static", calib=[x], exclude=[])
    >>> sorted(res.graph.quant), res.graph.quant["0.weight"].act_scale > 0
    (['0.weight', '2.weight'], True)
    >>> bool((res.model(x) - net(x)).abs().max() < 0.05)
    True
    """
    cfg = validate_quant_config(scheme, observer, percentile, smooth, calib, exclude)
    if not isinstance(inplace, bool):
        raise ConfigError(f"inplace={inplace!r}: pass True or False")
    model, graph, prior = _unwrap(model, graph)
    calib = list(calib) if calib is not None else []
    inputs = example_inputs if example_inputs is not None else (calib[0] if calib else None)
    if isinstance(model, (str, os.PathLike)):
        if inplace:
            raise ConfigError("inplace=True with a path: the file is not rewritten; drop inplace "
                              "and save result.model")  # fmt: skip
        from graphprune.frontends.onnx.files import load_onnx

        model = load_onnx(model)[0]
    kind = frontends.kind_of(model)
    if graph is not None and (not isinstance(graph, PruneGraph) or graph.frontend != kind):
        got = graph.frontend if isinstance(graph, PruneGraph) else type(graph).__name__
        raise ConfigError(f"graph= is not a capture of this model: the model is {kind}, the "
                          f"graph {got}; pass gp.capture(model, example_inputs) or leave it out")
    report = QuantReport(cfg.scheme)
    if prior:
        report.notes.append(prior)
    if kind == "onnx":
        return _quantize_onnx(model, inputs, cfg, calib, exclude, graph, report)
    return _quantize_torch(model, inputs, cfg, calib, exclude, graph, report, inplace)


def _unwrap(model, graph):
    """The model and graph of a prior result (a sparsify result's graph has its masks; a prune
    result's graph is of the model before pruning, so the pruned model is captured again)."""
    if not (hasattr(model, "model") and hasattr(model, "report")):
        return model, graph, None
    res, model = model, model.model
    if graph is None and hasattr(res, "masks") and isinstance(res.graph, PruneGraph):
        g = res.graph
        return model, g, f"masks of {len(g.masks)} weights kept from {type(res).__name__}"
    return model, graph, f"quantized {type(res).__name__}.model"


def _own_graph(graph: PruneGraph) -> PruneGraph:
    """A copy whose records (weights, masks, quant) can change without touching ``graph``."""
    g = copy.copy(graph)
    g.weights, g.masks, g.quant = dict(graph.weights), dict(graph.masks), {}
    g._cache = {}
    return g


def _capture(model, inputs, report: QuantReport) -> PruneGraph | None:
    if inputs is None and frontends.kind_of(model) == "torch":
        report.notes.append("no graph: no example_inputs nor calib to capture the model with")
        return None
    try:
        with hf.capture_mode(model):
            return frontends.capture(model, inputs)
    except Exception as e:  # noqa: BLE001 - quantization works without a graph; said in notes
        report.notes.append(f"no graph: capture failed ({type(e).__name__}: {e})")
        return None


def _graph_names(graph: PruneGraph, names) -> dict[str, str]:
    canonical = {n: w for w in graph.weights for n in graph.param_names(w)}
    return {k: canonical[k] for k in names if k in canonical}


# -- torch ------------------------------------------------------------------------------------
def _quantize_torch(model, inputs, cfg: QuantConfig, calib, exclude, graph, report,
                    inplace: bool) -> QuantizeResult:  # fmt: skip
    work = model if inplace else copy.deepcopy(model)
    targets = find_targets(work)
    if exclude is None:
        head = find_head(work, targets, inputs)
        exclude = [head] if head else []
        if head:
            report.excluded[head] = "output head (default; exclude=[] quantizes it)"
    else:
        for t in targets:
            if match_exclude(t.name, list(exclude)):
                report.excluded[t.name] = "exclude="
    targets = [t for t in targets if not match_exclude(t.name, list(exclude))]
    g = _capture(model, inputs, report) if graph is None else graph
    g = _own_graph(g) if g is not None else None
    smoothed: set[str] = set()
    if cfg.smooth is not None:
        smoothed = _smooth(work, targets, calib, cfg.smooth, g, report)
    observers = observe_torch(work, targets, calib) if calib else {}
    qt = []
    for t in targets:
        w = t.module.weight.detach().float().cpu().numpy()
        conv = t.module.__class__.__name__.startswith("Conv") and not t.transposed
        qt.append(QuantTarget(t.name, t.param_name, w, 1 if t.transposed else 0,
                              per_token=not conv, groups=t.groups))  # fmt: skip
    specs = choose_specs(qt, observers, cfg, report, smoothed)
    layers = {t.param_name: t.name for t in targets}
    out = fake_quant.apply_fake_quant(work, specs, layers, inplace=True)
    if g is not None:
        names = _graph_names(g, specs)
        if len(names) < len(specs):
            report.notes.append(f"graph: no parameter for {sorted(set(specs) - set(names))[:3]}; "
                                "those specs are only in result.specs")
        g.quant = {names[k]: specs[k] for k in names}
    return QuantizeResult(out, g, report, specs)


def _smooth(work, targets, calib, alpha: float, g: PruneGraph | None,
            report: QuantReport) -> set[str]:  # fmt: skip
    """Migrate scales across every eligible norm -> linears pair; the linears' weight names."""
    if g is None:
        report.notes.append("smooth: not applied, it needs the graph to check which norms feed "
                            "only linears (see the capture note)")
        return set()
    pairs, skipped = find_smooth_pairs(g)
    report.not_smoothed.update(skipped)
    by_param = {t.param_name: t for t in targets}
    names = {gname: tname for tname, gname in _graph_names(g, by_param).items()}
    todo = []
    for p in pairs:
        if not all(w in names for w in p.linears):
            report.not_smoothed[p.norm] = "a linear it feeds is excluded or not a target"
            continue
        todo.append((p, by_param[names[p.linears[0]]]))
    if not todo:
        return set()
    obs = observe_torch(work, [t for _, t in todo], calib)
    smoothed = set()
    for p, t in todo:
        if not obs[t.name].seen:
            report.not_smoothed[p.norm] = "no calibration batch ran it"
            continue
        arrays = {n: work.get_parameter(n).detach().float().cpu().numpy()
                  for n in (*p.scales, *p.linears)}  # fmt: skip
        s = smooth_factors(obs[t.name].chan_max, [arrays[w] for w in p.linears], alpha)
        new = migrate(p, arrays, s)
        fake_quant.write_params(work, new)
        g.weights.update(new)
        report.smoothed[p.norm] = list(p.linears)
        smoothed.update(names[w] for w in p.linears)
    return smoothed


# -- ONNX -------------------------------------------------------------------------------------
def _quantize_onnx(model, inputs, cfg: QuantConfig, calib, exclude, graph, report):
    if cfg.smooth is not None:
        raise ConfigError("smooth= needs a torch model (it rewrites norm and linear parameters); "
                          "quantize the torch model, or drop smooth for the ONNX one")
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, list[tuple[str, str, int, bool, int]]] = {}
    node_in = {}
    for n in model.graph.node:
        if n.input:
            node_in[n.name or n.output[0]] = (
                n.input[0], next((a.i for a in n.attribute if a.name == "group"), 1))
    for w, node, op, red in weight_uses(model):
        axis = 0 if op == "Conv" else 1 - red
        uses.setdefault(w, []).append((node, op, axis, op != "Conv", node_in[node][1]))
    names = list(uses)
    if exclude is None:
        exclude = [names[-1]] if names else []
        for n in exclude:
            report.excluded[n] = "output head (default; exclude=[] quantizes it)"
    targets, plan = [], {}
    for w in names:
        if match_exclude(w, list(exclude)) or match_exclude(uses[w][0][0], list(exclude)):
            report.excluded.setdefault(w, "exclude=")
            continue
        if len({u[2] for u in uses[w]}) > 1:
            report.excluded[w] = "used with two different output axes; left in float"
            continue
        node, op, axis, per_token, groups = uses[w][0]
        arr = numpy_helper.to_array(inits[w]).astype(np.float32)
        targets.append(QuantTarget(w, w, arr, axis, per_token=per_token,
                                   groups=groups if op == "Conv" else 1))  # fmt: skip
        plan[w] = [(u[0], 0, u[3]) for u in uses[w]]
    observers: dict[str, ActObserver] = {}
    if calib:
        x_of = {t.layer: node_in[uses[t.layer][0][0]][0] for t in targets}
        observers = {t.layer: ActObserver(t.layer) for t in targets}
        for vals in qdq.tensor_values(model, sorted(set(x_of.values())), calib):
            for t in targets:
                x = vals[x_of[t.layer]]
                rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if not t.per_token \
                    else x.reshape(-1, x.shape[-1])  # fmt: skip
                observers[t.layer].add(rows)
        for t in targets:
            if not t.per_token:
                t.groups = 0  # channel rows, not im2col rows: no per-layer error for convs
    specs = choose_specs(targets, observers, cfg, report)
    out = qdq.write_qdq(model, specs, {k: plan[k] for k in specs})
    g = graph if graph is not None else _capture(model, inputs, report)
    if g is not None:
        g = _own_graph(g)
        names_g = _graph_names(g, specs)
        g.quant = {names_g[k]: specs[k] for k in names_g}
    return QuantizeResult(out, g, report, specs, source=model)
