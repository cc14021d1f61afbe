"""``gp.prune``: structured pruning as one call, for torch modules and ONNX models alike.

capture → ``BuildCoupling`` (groups) → ``PruneChannels`` (criterion scores, selection: scope,
overrides, targets) → ``PlanRemoval`` (removal plan), run by ``graphprune.passes.base.run_passes``
→ write-back (module form, or GraphModule, or ONNX) → report. A failure inside a pass that is
not one of graphprune's errors surfaces as ``PassError`` naming the pass.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field
from typing import Any, Callable

from graphprune.api.graph import capture
from graphprune.api.options import check_prune_options
from graphprune.ir import PruneGraph
from graphprune.ir.errors import ConfigError
from graphprune.ir.plan import RemovalPlan
from graphprune.passes import cost as cost_model
from graphprune.passes.base import run_passes
from graphprune.passes.coupling import BuildCoupling, build_coupling
from graphprune.passes.prune.channels import PruneChannels, PruneConfig, Selection
from graphprune.passes.prune.plan import PlanRemoval, plan_removal


@dataclass
class LayerRow:
    param: str
    before: tuple[int, ...]
    after: tuple[int, ...]


@dataclass
class PruneReport:
    """What was removed and what it saved. ``form`` says what ``result.model`` is."""

    form: str
    criterion: str
    scope: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerRow] = field(default_factory=list)
    macs_per_op: list[tuple[str, int, int]] = field(default_factory=list)
    removed: dict[int, tuple[int, int, str]] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Input axes the result accepts at any size in a range (``DynamicAxis``: input, axis, dim
    #: name, min, max) and, by ``"input[axis]"``, why an axis meant to be dynamic is static.
    dynamic_axes: list = field(default_factory=list)
    static_axes: dict[str, str] = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_text(self, max_rows: int = 40) -> str:
        out = [
            f"structured pruning: criterion={self.criterion} scope={self.scope} "
            f"ratio={self.ratio:.3f} -> {self.form}",
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%}); "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%})",
            f"groups pruned: {len(self.removed)}; frozen: {len(self.frozen)}; "
            f"excluded: {len(self.excluded)}",
        ]
        for gid, (k, n, desc) in list(self.removed.items())[:max_rows]:
            out.append(f"  group {gid:>3}: removed {k:>4}/{n:<4} {desc}")
        changed = [r for r in self.layers if r.before != r.after]
        out.append(f"layers changed: {len(changed)}")
        for r in changed[:max_rows]:
            out.append(f"  {r.param}: {list(r.before)} -> {list(r.after)}")
        for op, b, a in self.macs_per_op[:max_rows]:
            if a != b:
                out.append(f"  MACs {op}: {b:,} -> {a:,}")
        for gid, why in list(self.frozen.items())[:max_rows]:
            out.append(f"  frozen group {gid}: {why}")
        for gid, why in self.excluded.items():
            out.append(f"  excluded group {gid}: {why}")
        if self.dynamic_axes:
            out.append("dynamic axes: " + "; ".join(a.describe() for a in self.dynamic_axes))
            notes = {a.name: a.note for a in self.dynamic_axes if getattr(a, "note", "")}
            out += [f"  {name}: {why}" for name, why in notes.items()]
        for where, why in self.static_axes.items():
            out.append(f"  static axis {where}: {why}")
        out += [f"note: {n}" for n in self.notes]
        if self.form == "graph_module":
            out.append("form: res.model is a torch.fx.GraphModule (it runs without graphprune"
                       + (", at any size in the dynamic axes' ranges" if self.dynamic_axes
                          else "") + "); save it with torch.export.save(res.exported_program(), "
                       "'model.pt2'), run it with torch.export.load('model.pt2').module()")  # fmt: skip
        return "\n".join(out)


@dataclass
class PruneResult:
    model: Any
    report: PruneReport
    graph: PruneGraph
    plan: RemovalPlan
    selection: Selection
    blocks: list = field(default_factory=list)
    block_scores: Any = None
    dropped: list = field(default_factory=list)
    source_config: Any = None  # a transformers model's config before pruning

    def __post_init__(self) -> None:
        if self.graph is not None and not self.report.dynamic_axes:
            self.report.dynamic_axes = list(getattr(self.graph, "dynamic_axes", []))
            self.report.static_axes = dict(getattr(self.graph, "static_axes", {}))

    def exported_program(self) -> Any:
        """A torch ``GraphModule`` result as a ``torch.export.ExportedProgram`` with the same
        dynamic axes, for ``torch.export.save`` (reload: ``torch.export.load(p).module()``)."""
        from graphprune.frontends.torch.dynamic import export_pruned

        if self.graph is None or self.graph.frontend != "torch" or self.report.form == "module":
            raise ConfigError(f"exported_program() is for torch GraphModule results; this result "
                              f"is a {self.report.form}: save it the way its type saves")  # fmt: skip
        return export_pruned(self.model, self.graph)

    def save_pretrained(self, path: str) -> None:
        """Save a pruned ``transformers`` model so that it reloads.

        When its config expresses the result (the default, ``uniform=True``), this is the model's
        own ``save_pretrained``: plain ``transformers`` ``from_pretrained`` reloads it. Otherwise
        (per-layer widths) it writes safetensors weights, the original config and the removal
        plan as JSON; :func:`graphprune.from_pretrained` rebuilds the model. No pickle.
        """
        from graphprune.frontends.torch import hf

        if self.report.form != "module" or not hf.is_hf(self.model):
            raise ConfigError(
                f"save_pretrained is for transformers models returned in module form; this "
                f"result is a {self.report.form}: save a torch.fx.GraphModule with "
                "torch.export.save(res.exported_program(), path)"
            )
        if hf.rebuilds(self.model):
            self.model.save_pretrained(path)
            return
        removed = {str(g): [int(i) for i in idx] for g, idx in self.selection.removal.items()}
        hf.save_pruned(self.model, path, self.source_config, {"removed": removed})


def prune(model_or_onnx: Any, example_inputs: Any = None, ratio: float = 0.5,
          criterion: str | Callable = "l2", scope: str = "local", *,
          target_macs: float | None = None, target_params: float | None = None,
          ratios: dict[str, float] | None = None, ignore: list[str] | None = None,
          round_to: int | None = None, min_keep: float = 0.1, heads: bool = True,
          calib: Any = None, loss_fn: Callable | None = None, inplace: bool = False,
          seed: int = 0, graph: PruneGraph | None = None, drop_blocks: int = 0,
          depth_unit: str = "branch", uniform: bool | None = None,
          dynamic_shapes: Any = None) -> PruneResult:  # fmt: skip
    """Remove coupled channels, neurons and heads; return a smaller model and a report.

    Parameters
    ----------
    model_or_onnx : torch.nn.Module, onnx.ModelProto or path
    example_inputs : tuple of tensors (torch: required, batch >= 2; ONNX: optional, the sizes
        its symbolic dims are analysed and checked at)
    ratio : fraction of the prunable group indices to remove, in [0, 1) (ignored, and may be
        ``None``, when a target or ``drop_blocks`` is given)
    criterion : ``l1``, ``l2``, ``random``, ``fpgm``, ``bn_scale``, ``taylor``, ``hessian``,
        ``activation``, ``apoz``, ``wanda`` or a callable ``fn(ctx, group) -> scores``
    scope : ``local`` (every group loses ``ratio``) or ``global`` (ranked across groups)
    target_macs, target_params : reach this fraction of the original by search instead
    ratios : per-layer overrides ``{"glob": ratio}`` (matched against parameter/module names)
    ignore : globs of layers never to prune
    round_to : keep channel counts multiples of this
    min_keep : never shrink a group below this fraction
    heads : prune whole attention heads (with GQA a kv head goes with its query heads)
    calib : iterable of batches (tuples of input tensors, optionally followed by targets) for
        data-driven criteria; ``loss_fn(output, batch)`` for gradient criteria sees the whole
        batch (default loss: half the mean squared output)
    inplace : modify the user's module (torch, module form only)
    drop_blocks : depth pruning instead: remove this many residual branches (y = x + f(x)),
        ranked by ``criterion="block_influence"`` (needs ``calib``), a dict
        ``{block name: score}`` or a callable ``(graph, blocks) -> scores`` (lowest go first)
    depth_unit : ``"branch"`` (each residual branch is a block) or ``"layer"`` (branches chained
        inside one numbered container, a transformer layer's attention and MLP, go together;
        Block Influence is then measured across the whole layer, as in ShortGPT)
    uniform : cut the same number of heads, kv heads and MLP channels in every layer (ranked by
        importance summed across layers), and only what the model's config can express, so that
        a ``transformers`` model reloads with its own ``from_pretrained`` (as NVIDIA Minitron
        does). Default: True for ``transformers`` models, False otherwise. The report says what
        was left alone and why.
    dynamic_shapes : torch: ``torch.export``'s own (``{"x": {0: torch.export.Dim("batch",
        min=1, max=64)}}``); default batch dynamic for every input and the sequence axis of
        integer inputs within the model's maximum positions (an axis the model fixes falls back
        to static; ``report.dynamic_axes`` / ``report.static_axes`` say which). ONNX:
        ``{dim_param: (min, max)}`` (default ``(1, 64)`` for each symbolic input dim): the
        pruned ONNX keeps the dims symbolic and runs at both ends

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> res = gp.prune(m, (torch.randn(2, 8),), ratio=0.5)
    >>> res.model[0].out_features, res.report.form
    (8, 'module')
    """
    from graphprune.frontends.torch import hf

    check_prune_options(ratio=ratio, criterion=criterion, scope=scope, target_macs=target_macs,
                        target_params=target_params, ratios=ratios, ignore=ignore,
                        round_to=round_to, min_keep=min_keep, heads=heads, calib=calib,
                        loss_fn=loss_fn, inplace=inplace, seed=seed, drop_blocks=drop_blocks,
                        depth_unit=depth_unit, uniform=uniform)  # fmt: skip
    ratio = 0.0 if ratio is None else ratio  # only where a target or drop_blocks replaces it
    is_hf = hf.is_hf(model_or_onnx)
    if drop_blocks:
        if inplace:
            raise ConfigError("depth pruning returns a new model; inplace=True is not supported")
        with hf.capture_mode(model_or_onnx):
            pg = graph if graph is not None else capture(model_or_onnx, example_inputs,
                                                          dynamic_shapes=dynamic_shapes)
        res = _prune_depth(pg, drop_blocks, criterion, calib, depth_unit)
        if is_hf:
            _hf_depth_module(model_or_onnx, pg, res)
        return res
    cfg = PruneConfig(ratio, criterion, scope, target_macs, target_params, ratios, ignore, round_to,
                      min_keep, heads, calib, loss_fn, seed)  # fmt: skip
    cfg.validate()
    cfg.uniform = is_hf if uniform is None else bool(uniform)
    with hf.capture_mode(model_or_onnx):
        pg = graph if graph is not None else capture(model_or_onnx, example_inputs,
                                                          dynamic_shapes=dynamic_shapes)
    hf_notes: list[str] = []
    if is_hf and cfg.uniform:
        cfg.exclude, hf_notes = hf.unexpressible(model_or_onnx, _group_members(pg))
    source_config = copy.deepcopy(model_or_onnx.config) if is_hf else None
    done = run_passes(pg, [
        (BuildCoupling(), {}),
        (PruneChannels(), {"config": cfg}),
        (PlanRemoval(), lambda results: {"removal": results["PruneChannels"].value.removal}),
    ])  # fmt: skip
    sel, plan = done["PruneChannels"].value, done["PlanRemoval"].value
    model, form = _write_back(model_or_onnx, pg, plan, inplace)
    report = _report(pg, plan, sel, cfg, form)
    report.notes += hf_notes
    if is_hf:
        report.notes.append(_hf_save_note(model, form))
    return PruneResult(model, report, pg, plan, sel, source_config=source_config)


def _hf_depth_module(model: Any, pg: PruneGraph, res: PruneResult) -> None:
    """Dropped whole decoder layers of a transformers model: the same class with fewer layers
    (``num_hidden_layers`` and layer indices updated), when it reproduces the GraphModule."""
    from graphprune.frontends.torch import hf

    smaller = hf.drop_layers(model, [b.params for b in res.dropped], res.model, pg.source.args,
                             pg.source.kwargs)  # fmt: skip
    if smaller is None:
        res.report.notes.append("the dropped blocks are not whole layers of the transformers "
                                "model: a torch.fx.GraphModule is returned")  # fmt: skip
        return
    res.model, res.report.form = smaller, "module"
    res.source_config = copy.deepcopy(model.config)
    res.report.notes.append(_hf_save_note(smaller, "module"))


def _group_members(pg: PruneGraph) -> list[tuple[int, list[tuple[str, int]], bool]]:
    from graphprune.passes.prune.channels import is_head_group

    return [(g.id, [(m.param, m.axis) for m in g.params], is_head_group(pg, g))
            for g in build_coupling(pg).groups if g.prunable]  # fmt: skip


def _hf_save_note(model: Any, form: str) -> str:
    from graphprune.frontends.torch import hf

    if form != "module":
        return ("a transformers model came back as a torch.fx.GraphModule (its forward hard-codes "
                "a size the write-back could not update): there is no save_pretrained")  # fmt: skip
    if hf.rebuilds(model):
        return ("the config expresses the pruned sizes: res.model.save_pretrained(d) reloads "
                "with transformers' own from_pretrained(d)")  # fmt: skip
    return ("layers differ in width, which the config cannot express: save with "
            "res.save_pretrained(d) and reload with graphprune.from_pretrained(d)")


def _write_back(model: Any, pg: PruneGraph, plan: RemovalPlan, inplace: bool) -> tuple[Any, str]:
    if pg.frontend == "onnx":
        if inplace:
            raise ConfigError("inplace=True is for torch modules; an ONNX model is returned anew")
        from graphprune.frontends.onnx.writeback import apply_plan_onnx

        return apply_plan_onnx(pg, plan), "onnx"
    from graphprune.frontends.torch.module_form import module_form, reference_outputs
    from graphprune.frontends.torch.graph_module import apply_plan_torch

    # The GraphModule holds a pruned copy of every weight: keep only its outputs while the
    # module form is built, and rebuild it in the rare case it is the result.
    want = reference_outputs(apply_plan_torch(pg, plan, share=True), pg)
    gc.collect()  # a GraphModule is a reference cycle: free its pruned weights now
    mod = module_form(model, pg, plan, want, inplace=inplace)
    if mod is not None:
        return mod, "module"
    gm = apply_plan_torch(pg, plan, verify=False)
    if inplace:
        raise ConfigError(
            f"{type(model).__name__} cannot be pruned in place: its forward hard-codes sizes "
            "(a reshape to a fixed number of heads or width). Use inplace=False and the returned "
            "torch.fx.GraphModule."
        )
    return gm, "graph_module"


def _report(pg: PruneGraph, plan: RemovalPlan, sel: Selection, cfg: PruneConfig,
            form: str) -> PruneReport:  # fmt: skip
    before, after = cost_model.count(pg), cost_model.count(pg, plan.new_shapes)
    rows, seen = [], set()
    for p in pg.params():
        name = pg.value(p).param
        if name in seen:
            continue
        seen.add(name)
        rows.append(LayerRow(name, tuple(pg.value(p).shape), tuple(plan.new_shapes.get(p, pg.value(p).shape))))
    groups = build_coupling(pg).groups
    crit = cfg.criterion if isinstance(cfg.criterion, str) else getattr(cfg.criterion, "__name__", "custom")
    notes = list(sel.notes)
    approx = [g.id for g in groups if g.id in sel.removal and not g.exact]
    if approx:
        notes.append(f"groups {approx} feed normalisation statistics (LayerNorm/RMSNorm/mean): "
                     "removing them changes those statistics")  # fmt: skip
    if form == "graph_module":
        notes.append("the model's forward hard-codes sizes, so a torch.fx.GraphModule with "
                     "rewritten shapes is returned")  # fmt: skip
    return PruneReport(
        form, crit, cfg.scope, sel.ratio_used, before.params, after.params, before.macs,
        after.macs, rows,
        [(o, before.per_op[o], after.per_op.get(o, 0)) for o in before.per_op],
        {gid: (len(idx), groups[gid].size, groups[gid].describe()) for gid, idx in sel.removal.items()},
        {g.id: g.frozen_reason for g in groups if g.frozen_reason},
        sel.excluded, notes,
    )  # fmt: skip


def _prune_depth(pg: PruneGraph, k: int, criterion: Any, calib: Any, unit: str) -> PruneResult:
    from graphprune.passes.prune import drop_blocks as depth

    found = run_passes(pg, [(depth.DropBlocks(), {"k": k, "criterion": criterion, "calib": calib,
                                                  "unit": unit})])["DropBlocks"].value  # fmt: skip
    blocks, scores, dropped = found.blocks, found.scores, found.dropped
    model = depth.drop(pg, dropped)
    base = cost_model.count(pg)
    macs, params = depth.block_cost(pg, dropped)
    crit = criterion if isinstance(criterion, str) else "custom"
    notes = ["blocks (lower score goes first): " + ", ".join(
        f"{b.name}={s:.4f}" for b, s in zip(blocks, scores))]  # fmt: skip
    report = PruneReport(
        "graph_module" if pg.frontend == "torch" else "onnx", crit, "depth", k / len(blocks),
        base.params, base.params - params, base.macs, base.macs - macs,
        removed={b.id: (1, 1, f"block {b.name} ({len(b.ops)} ops)") for b in dropped},
        notes=notes,
    )
    sel = Selection({}, {}, ratio_used=k / len(blocks), notes=notes)
    result = PruneResult(model, report, pg, plan_removal(pg, {}), sel)
    result.blocks, result.block_scores, result.dropped = blocks, scores, dropped
    return result
