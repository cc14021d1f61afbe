"""``gp.sparsify``: weight masks (unstructured, N:M, block), recorded on the IR and written back.

capture (or the caller's ``graph=``) → a sparsity pass computes masks (torch:
:func:`graphprune.passes.sparsity.sparsify.compute_masks`, module-based calibration; ONNX:
:func:`graphprune.passes.sparsity.weight_arrays.compute_array_masks` on the initializers the
frontend lists) → the masks are recorded in ``graph.masks`` → the frontend's writer
(:mod:`graphprune.frontends.torch.masks`, :mod:`graphprune.frontends.onnx.masks`) zeroes the
weights outside them in a copy of the model, or in the model itself with ``inplace=True``.
Codegen reads ``graph.masks`` from the result (``gp.compile(res, ...)``) to pick sparse kernels.

Guarantees: the input model is never mutated unless ``inplace=True``, and then only after every
mask was computed and checked, so a failure leaves nothing half-applied (except for SparseGPT and
``update='obs'``, which write each layer's reconstructed weights as they go, so that no second
copy of the model is held; an error then names the layers already written). Every user error raises
:class:`graphprune.ir.errors.ConfigError` (or, for something that is not a model,
:class:`~graphprune.ir.errors.CaptureError`) naming the parameter and the fix. A model the
capture cannot handle is still sparsified: ``result.graph`` is then ``None`` and the report's
notes say why.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch

from graphprune import frontends
from graphprune.api.options import check_sparsify_options
from graphprune.frontends.onnx import masks as onnx_masks
from graphprune.frontends.torch import hf
from graphprune.frontends.torch import masks as torch_masks
from graphprune.frontends.torch.outputs import flatten_outputs
from graphprune.ir import PruneGraph
from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.config import validate_config, validate_exclude
from graphprune.passes.sparsity.distributed import Ranks
from graphprune.passes.sparsity.gradual import schedule_sparsity, validate_schedule
from graphprune.passes.sparsity.methods import LOSS_METHODS
from graphprune.passes.sparsity.report import MaskSet, SparsityReport
from graphprune.passes.sparsity.sparsify import compute_masks
from graphprune.passes.sparsity.weight_arrays import check_array_method, compute_array_masks

__all__ = ["SparsifyResult", "sparsify", "sparsify_gradually"]


@dataclass
class SparsifyResult:
    """What :func:`sparsify` returns. ``graph`` (``None`` when the model could not be captured,
    see ``report.notes``) holds the masks in ``graph.masks`` as numpy bool arrays."""

    model: Any  # nn.Module or onnx.ModelProto, like the input
    masks: dict[str, torch.Tensor]  # parameter / initializer name -> bool keep-mask, param shape
    report: SparsityReport
    graph: PruneGraph | None = None


def sparsify(model_or_onnx, example_inputs=None, sparsity=None, pattern="unstructured",
             method="magnitude", calib=None, scope="layer", min_keep=0.0, exclude=None,
             blocksize=128, percdamp=0.01, inplace=False, loss_fn=None, iterations=100,
             seed=0, prior_masks=None, allocation="uniform", refine=None, update=None, *,
             graph: PruneGraph | None = None, dynamic_shapes=None,
             distributed: bool = False) -> SparsifyResult:
    """Unstructured / N:M / block sparsity masks, recorded on the IR; the returned model's masked
    weights are exact zeros.

    Parameters
    ----------
    model_or_onnx : nn.Module, onnx.ModelProto or path of a .onnx file
        Targets are Linear / Conv1d / Conv2d (reduction dim ``in_channels/groups * kh * kw``) and
        transformers' Conv1D. ONNX input supports ``magnitude`` and ``random``.
    example_inputs : tensor, tuple or dict, optional
        One input batch: used to find the output head (last layer to run), by SynFlow (shape
        only) and to capture the graph (else the first ``calib`` batch is used). Without it the
        head is the last target registered.
    sparsity : float in [0, 1), optional
        Fraction of weights pruned in each comparison group. Default 0.5; for N:M it is implied
        (``1 - N/M``) and any other value is an error.
    pattern : {"unstructured", "N:M", "block:RxC"}
        N:M keeps N of every M consecutive weights along the reduction dim; block RxC tiles
        (output rows x reduction cols). Layers whose dims the pattern does not divide are left
        dense and listed in ``report.excluded``.
    method : {"magnitude", "random", "wanda", "obd", "sparsegpt", "taylor", "snip", "grasp",
              "synflow"}
        See :mod:`graphprune.passes.sparsity.methods`.
    calib : iterable of batches, optional
        Needed by wanda/obd/sparsegpt (model inputs) and taylor/snip/grasp (with ``loss_fn``).
        A batch is a tensor, a tuple of positional args or a dict of kwargs. If the model has an
        ``nn.ModuleList`` of blocks and ``scope="layer"``, calibration is sequential.
    scope : {"layer", "global"}
        ``global`` ranks all layers together; each keeps at least ``min_keep`` of its weights.
    exclude : list of str, optional
        Module names or globs left dense. ``None`` excludes the output head; a list replaces that
        default (``exclude=[]`` prunes the head too). Embeddings are never pruned.
    blocksize, percdamp : SparseGPT's column block and Hessian damping (fraction of mean diag).
    inplace : bool
        Write the result into the model given, without a copy of it: memory stays bounded for
        large models (masks, one block's activations and statistics on top of the model). Mask-only
        methods write only after everything succeeded; SparseGPT and ``update='obs'`` write each
        layer's new weights as they are computed (an error then says which were written).
    loss_fn : callable(model, batch) -> scalar, optional
        For taylor/snip/grasp; default cross-entropy on ``(inputs, labels)`` batches.
    iterations : int
        SynFlow pruning rounds (exponential schedule, default 100 as in the paper).
    seed : int
        For ``random``.
    prior_masks : dict, optional
        Masks from an earlier round (gradual schedules): pruned weights stay pruned.
    allocation : {"uniform", "owl"}
        ``owl``: per-block sparsities from activation outliers (Yin et al. 2024), same overall
        sparsity; wanda/sparsegpt, unstructured. See :mod:`graphprune.passes.sparsity.refine`.
    refine : {None, "dsnot"}
        ``dsnot``: training-free mask swaps per output row after Wanda (Zhang et al. 2024).
    update : {None, "obs"}
        ``obs``: after a mask-only criterion (wanda, obd, magnitude), update the kept weights with
        SparseGPT's OBS reconstruction from the layer Hessian (needs ``calib``).
    graph : PruneGraph, optional
        A capture of the model (``gp.capture``): the masks are recorded in its ``masks``
        (replacing what it held) and it is returned as ``result.graph``. Without it the model is
        captured here.
    dynamic_shapes : optional
        How the graph is captured (see :func:`graphprune.capture`): torch.export's ``Dim`` spec
        for torch (default: batch, and the sequence axis of integer inputs), ``{dim_param: (min,
        max)}`` for ONNX. The returned torch module is the user's own and runs at any shape.
    distributed : bool
        Call it on every rank of an initialised ``torch.distributed`` process group (e.g. under
        ``torchrun``), each with the same model, options and ``calib``: rank ``r`` calibrates on
        batches ``r, r + W, ...``, statistics are all-gathered and summed in batch order, layers'
        solves are split across ranks and broadcast, and every rank returns masks identical to a
        one-process run (:mod:`graphprune.passes.sparsity.distributed`). wanda, obd, sparsegpt
        (and ``update='obs'``) only. Never automatic: under torchrun without it each rank runs
        alone (collectives would hang a script that sparsifies on one rank only).

    Returns
    -------
    SparsifyResult(model, masks, report, graph)
        ``graph.masks`` maps each masked parameter (the graph's name of it, see
        ``PruneGraph.aliases`` for tied weights) to a bool numpy array of the weight's shape.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> res = sparsify(lin, (torch.randn(2, 8),), pattern="2:4", method="magnitude")
    >>> res.masks["0.weight"].float().mean().item(), list(res.report.excluded)
    (0.5, ['2'])
    >>> keep = res.graph.masks["0.weight"]
    >>> keep.shape, bool((res.model[0].weight[~torch.from_numpy(keep)] == 0).all())
    ((8, 8), True)
    """
    check_sparsify_options(seed=seed, inplace=inplace)
    model = _load_path(model_or_onnx, inplace)
    kind = _kind_of(model)
    _check_graph(graph, kind)
    ranks = _ranks(distributed, kind)
    found, capture_inputs = _compute(
        model, kind, example_inputs, sparsity=sparsity, pattern=pattern, method=method,
        calib=calib, scope=scope, min_keep=min_keep, exclude=exclude, blocksize=blocksize,
        percdamp=percdamp, loss_fn=loss_fn, iterations=iterations, seed=seed,
        prior_masks=prior_masks, allocation=allocation, refine=refine, update=update,
        inplace=inplace, ranks=ranks)
    graph = _record(model, kind, graph, capture_inputs, found, dynamic_shapes)
    if kind == "onnx":
        out = onnx_masks.apply_masks(model, found.masks, inplace)
    else:
        out = torch_masks.apply_masks(model, found.masks, inplace, found.values)
    return SparsifyResult(out, found.masks, found.report, graph)


def sparsify_gradually(model, sparsity: float, steps: int, fine_tune=None,
                       initial_sparsity: float = 0.0, schedule: str = "agp",
                       inplace: bool = False, *, graph: PruneGraph | None = None,
                       **kwargs) -> SparsifyResult:
    """Sparsify a torch model in ``steps`` rounds, fine-tuning between rounds with masks kept.

    Round ``t`` targets :func:`graphprune.passes.sparsity.gradual.schedule_sparsity` (AGP or
    linear); weights pruned in one round stay pruned. ``fine_tune(model, masks, step)`` trains
    ``model`` in place (create its optimizer inside and wrap it with
    :func:`graphprune.frontends.torch.masks.keep_masks` for exact zeros after every step; forward
    passes are masked already). ``kwargs`` go to :func:`sparsify` (method, pattern, calib, scope,
    example_inputs, ...); ``calib`` may be a callable ``calib(model) -> batches`` to recalibrate on
    the current model. Returns the last round's result, with ``report.notes`` listing each
    round's sparsity, and the final masks recorded on ``graph`` (a capture of ``model`` as given).
    """
    validate_schedule(sparsity, steps, initial_sparsity, schedule,
                      kwargs.get("pattern", "unstructured"), fine_tune)
    if _kind_of(model) != "torch":
        raise ConfigError("sparsify_gradually fine-tunes between rounds: it needs a torch model")
    _check_graph(graph, "torch")
    calib = kwargs.pop("calib", None)
    work = model if inplace else copy.deepcopy(model)
    masks, found, notes, captured = None, None, [], None
    for t in range(1, steps + 1):
        s_t = schedule_sparsity(t, steps, sparsity, initial_sparsity, schedule)
        c = calib(work) if callable(calib) else calib
        found, inputs = _compute(work, "torch", sparsity=s_t, calib=c, prior_masks=masks,
                                 **kwargs)
        if t == 1:  # the model as given: nothing has been written yet
            captured = _graph_of(model, "torch", graph, inputs)
        torch_masks.apply_masks(work, found.masks, True, found.values)
        masks = found.masks
        notes.append(f"round {t}/{steps}: target {s_t:.4f}, got "
                     f"{found.report.total_sparsity:.4f}")
        if fine_tune is not None:
            with torch_masks.keep_masks(work, masks):
                fine_tune(work, masks, t)
    found.report.notes.extend(notes)
    return SparsifyResult(work, masks, found.report,
                          _record_on(captured, found, user_graph=graph is not None))


# -- steps ------------------------------------------------------------------------------------
def _kind_of(model: Any) -> str:
    return frontends.kind_of(model)


def _load_path(model: Any, inplace: bool) -> Any:
    """The ``onnx.ModelProto`` of a ``.onnx`` path (external data loaded), as ``gp.prune`` takes
    one; anything else as given."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        raise ConfigError(f"{os.fspath(model)!r} is a Hugging Face checkpoint folder: stream it "
                          "with gp.sparsify_checkpoint(src, dst, calib, ...) (written to dst "
                          "layer by layer), or load it with from_pretrained and pass the model")
    if inplace:
        raise ConfigError(f"inplace=True with the path {os.fspath(model)!r}: the file is not "
                          "rewritten; drop inplace and save result.model (onnx.save)")
    from graphprune.frontends.onnx.files import load_onnx

    return load_onnx(model)[0]


def _compute(model, kind: str, example_inputs=None, sparsity=None, pattern="unstructured",
             method="magnitude", calib=None, scope="layer", min_keep=0.0, exclude=None,
             blocksize=128, percdamp=0.01, loss_fn=None, iterations=100, seed=0,
             prior_masks=None, allocation="uniform", refine=None,
             update=None, inplace=False, ranks=None) -> tuple[MaskSet, Any]:
    """Validate the options and run the sparsity pass for ``kind``; nothing is written (but
    with ``inplace``, the weights a reconstruction method computes: see ``compute_masks``).
    Returns the masks and the inputs to capture the model with (``None`` if there are none)."""
    if kind == "onnx":
        if (allocation, refine, update) != ("uniform", None, None):
            raise ConfigError("allocation/refine/update need a torch model (ONNX input supports "
                              "magnitude and random masks only)")
        check_array_method(method)
    cfg, calib = validate_config(
        sparsity=sparsity, pattern=pattern, method=method, scope=scope, min_keep=min_keep,
        blocksize=blocksize, percdamp=percdamp, iterations=iterations, seed=seed, calib=calib,
        example_inputs=example_inputs, loss_fn=loss_fn, allocation=allocation, refine=refine,
        update=update)
    exclude = validate_exclude(exclude)
    if kind == "onnx":
        found = compute_array_masks(onnx_masks.initializer_arrays(model),
                                    onnx_masks.weight_uses(model), cfg, exclude)
        return found, example_inputs
    found = compute_masks(model, cfg, calib=calib, example_inputs=example_inputs,
                          exclude=exclude, loss_fn=loss_fn, prior_masks=prior_masks,
                          flatten_outputs=flatten_outputs, inplace=inplace, ranks=ranks)
    # Inputs to capture the model with: example_inputs, else the first calibration batch when
    # batches are model inputs (a loss method's are (inputs, labels)).
    if example_inputs is None and calib and method not in LOSS_METHODS:
        example_inputs = calib[0]
    return found, example_inputs


def _ranks(distributed: Any, kind: str) -> Ranks | None:
    """The process group's ranks for ``distributed=True`` (ConfigError when there is none)."""
    if not isinstance(distributed, bool):
        raise ConfigError(f"distributed={distributed!r}: pass True or False")
    if not distributed:
        return None
    if kind != "torch":
        raise ConfigError("distributed=True needs a torch model (it splits calibration, which "
                          "ONNX input does not run)")
    return Ranks()


def _check_graph(graph: PruneGraph | None, kind: str) -> None:
    """The caller's ``graph=`` must be a PruneGraph of the model's frontend (its parameters are
    checked against the masks once they are computed, before anything is written)."""
    if graph is not None and (not isinstance(graph, PruneGraph) or graph.frontend != kind):
        got = graph.frontend if isinstance(graph, PruneGraph) else type(graph).__name__
        raise ConfigError(f"graph= is not a capture of this model: the model is {kind}, "
                          f"the graph {got}; pass gp.capture(model, example_inputs)")


def _graph_of(model, kind: str, graph: PruneGraph | None, inputs,
              dynamic_shapes=None) -> PruneGraph | str:  # fmt: skip
    """The caller's graph, else a capture of ``model``, else why there is none (a string)."""
    if graph is not None:
        return graph
    if kind == "torch" and inputs is None:
        return "no example_inputs (nor calib batches of model inputs) to capture it with"
    try:
        with hf.capture_mode(model):
            return frontends.capture(model, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - any capture failure: sparsify works without a graph
        return f"capture failed ({type(e).__name__}: {e})"


def _mask_names(graph: PruneGraph, masks: dict[str, torch.Tensor]) -> dict[str, str] | str:
    """Mask name -> the graph's name of that parameter, or what does not match (a string)."""
    canonical = {n: w for w in graph.weights for n in graph.param_names(w)}
    unknown = sorted(set(masks) - set(canonical))
    if unknown:
        return f"it has no {unknown[:3]}"
    for k, m in masks.items():
        shape = tuple(graph.weights[canonical[k]].shape)
        if shape != tuple(m.shape):
            return f"its {canonical[k]!r} has shape {shape}, the mask {tuple(m.shape)}"
    return {k: canonical[k] for k in masks}


def _record_on(graph: PruneGraph | str, found: MaskSet, user_graph: bool) -> PruneGraph | None:
    """Record ``found.masks`` in ``graph.masks``; a mismatch is the caller's error for a graph
    they passed, and a note (no graph) for one captured here."""
    if isinstance(graph, str):
        found.report.notes.append(f"no graph: {graph}; result.graph is None (masks are in "
                                  "result.masks)")
        return None
    names = _mask_names(graph, found.masks)
    if isinstance(names, str):
        if user_graph:
            raise ConfigError(f"graph= is not a capture of this model: {names}")
        found.report.notes.append(f"no graph: the capture does not match the masks ({names}); "
                                  "result.graph is None")
        return None
    graph.masks.clear()
    for k, m in found.masks.items():
        # Shares memory with result.masks (no second copy of the masks for a large model).
        keep = m.detach().cpu().numpy().astype(bool, copy=False)
        # Two names of one tied tensor, each masked: what is written is both masks' product.
        prior = graph.masks.get(names[k])
        graph.masks[names[k]] = keep if prior is None else prior & keep
    return graph


def _record(model, kind: str, graph: PruneGraph | None, inputs,
            found: MaskSet, dynamic_shapes=None) -> PruneGraph | None:  # fmt: skip
    return _record_on(_graph_of(model, kind, graph, inputs, dynamic_shapes), found,
                      user_graph=graph is not None)  # fmt: skip
