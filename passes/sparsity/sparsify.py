"""``sparsify``: weight masks (unstructured, N:M, block) for a torch model or an ONNX model.

Pipeline position: a plan+apply pass. It reads the model (not the PruneGraph yet), computes
boolean masks with one of the criteria in ``sparsity_methods``, writes masked weights (exact
zeros; SparseGPT also updates the kept weights) into a copy of the model, and reports per layer.
The TVM backend consumes the masks to pick sparse / N:M kernels. Optional training-free
refinements (``sparsity_refine``): OWL per-block ratios, DSnoT mask swaps, and SparseGPT's OBS
weight update applied to another criterion's mask.

Guarantees: the input model is never mutated unless ``inplace=True``, and then only after every
mask was computed (all work happens on a copy first), so a failure leaves nothing half-applied.
Every user error raises :class:`graphprune.ir.errors.ConfigError` naming the parameter and the fix.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphprune.ir.errors import ConfigError

from graphprune.passes.sparsity.calibration import BlocksDoNotChain, LayerStats, SequentialBlocks, collect_whole
from graphprune.passes.sparsity.methods import (
    ACTIVATION_METHODS,
    LOSS_METHODS,
    METHODS,
    SynFlow,
    gradient_scores,
    magnitude_scores,
    obd_scores,
    random_scores,
    sparsegpt_prune,
    wanda_scores,
)
from graphprune.passes.sparsity.patterns import NM, Block, Pattern, Unstructured, check_mask, fits, parse_pattern
from graphprune.passes.sparsity.patterns import select_global, select_mask
from graphprune.passes.sparsity.refine import dsnot_refine, outlier_ratio, owl_sparsities
from graphprune.passes.sparsity.report import LayerSparsity, SparsityReport, relative_error
from graphprune.passes.sparsity.targets import Target, find_blocks, find_head, find_targets, is_embedding
from graphprune.passes.sparsity.targets import match_exclude

__all__ = ["SparsifyResult", "sparsify"]

OWL_M, OWL_LAMBDA = 5.0, 0.08  # outlier threshold (x mean score) and ratio spread: the paper's


@dataclass
class SparsifyResult:
    model: Any  # nn.Module or onnx.ModelProto, like the input
    masks: dict[str, torch.Tensor]  # parameter / initializer name -> bool keep-mask, param shape
    report: SparsityReport


@dataclass
class _Config:
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


def _validate_extras(cfg: _Config) -> None:
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


def _validate(sparsity, pattern, method, scope, min_keep, blocksize, percdamp, iterations, seed,
              calib, example_inputs, loss_fn, allocation="uniform", refine=None,
              update=None) -> tuple[_Config, list | None]:
    pat = parse_pattern(pattern)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")
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
    cfg = _Config(pat, float(sparsity), method, scope, float(min_keep), blocksize,
                  float(percdamp), iterations, int(seed), allocation, refine, update)
    _validate_extras(cfg)
    return cfg, calib


def sparsify(model, example_inputs=None, sparsity=None, pattern="unstructured",
             method="magnitude", calib=None, scope="layer", min_keep=0.0, exclude=None,
             blocksize=128, percdamp=0.01, inplace=False, loss_fn=None, iterations=100,
             seed=0, prior_masks=None, allocation="uniform", refine=None,
             update=None) -> SparsifyResult:
    """Compute weight masks and return a model whose masked weights are exact zeros.

    Parameters
    ----------
    model : nn.Module or onnx.ModelProto
        Targets are Linear / Conv1d / Conv2d (reduction dim ``in_channels/groups * kh * kw``) and
        transformers' Conv1D. ONNX input supports ``magnitude`` and ``random``.
    example_inputs : tensor, tuple or dict, optional
        One input batch: used to find the output head (last layer to run) and by SynFlow (shape
        only). Without it the head is the last target registered.
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
        Write the result into ``model`` (only after everything succeeded).
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

    Returns
    -------
    SparsifyResult(model, masks, report)

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> res = sparsify(lin, pattern="2:4", method="magnitude")
    >>> res.masks["0.weight"].float().mean().item(), list(res.report.excluded)
    (0.5, ['2'])
    """
    if type(model).__name__ == "ModelProto":
        from graphprune.passes.sparsity.onnx_weights import sparsify_onnx

        if (allocation, refine, update) != ("uniform", None, None):
            raise ConfigError("allocation/refine/update need a torch model (ONNX input supports "
                              "magnitude and random masks only)")
        return sparsify_onnx(model, sparsity=sparsity, pattern=pattern, method=method,
                             calib=calib, scope=scope, min_keep=min_keep, exclude=exclude,
                             seed=seed)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected torch.nn.Module or onnx.ModelProto, got "
                          f"{type(model).__name__}")
    cfg, calib = _validate(sparsity, pattern, method, scope, min_keep, blocksize, percdamp,
                           iterations, seed, calib, example_inputs, loss_fn, allocation, refine,
                           update)
    if exclude is not None and (isinstance(exclude, str) or not all(
            isinstance(e, str) for e in exclude)):
        raise ConfigError("exclude must be a list of module names or globs, e.g. ['lm_head']")
    return _Sparsifier(model, cfg, calib, example_inputs, exclude, loss_fn, prior_masks).run(
        inplace)


class _Sparsifier:
    def __init__(self, model, cfg: _Config, calib, example_inputs, exclude, loss_fn, prior):
        self.user_model, self.cfg, self.calib = model, cfg, calib
        self.example_inputs, self.exclude, self.loss_fn = example_inputs, exclude, loss_fn
        self.prior = prior or {}
        self.report = SparsityReport(cfg.method, str(cfg.pattern), cfg.scope, cfg.sparsity, "none")

    # --- selection of layers -------------------------------------------------------------
    def _select_targets(self) -> list[Target]:
        rep, cfg = self.report, self.cfg
        for name, m in self.work.named_modules():
            if is_embedding(m):
                rep.excluded[name] = "embedding (never pruned)"
        targets = find_targets(self.work)
        batch = self.example_inputs
        if batch is None and self.calib and cfg.method not in LOSS_METHODS:
            batch = self.calib[0]  # loss-method batches are (inputs, labels), not model inputs
        head = find_head(self.work, targets, batch)
        used = set()
        active = []
        for t in targets:
            hit = match_exclude(t.name, self.exclude) if self.exclude is not None else None
            if self.exclude is None and t.name == head:
                rep.excluded[t.name] = ("output head (excluded by default; exclude=[] prunes "
                                        "it)")
            elif hit is not None:
                used.add(hit)
                rep.excluded[t.name] = f"matches exclude {hit!r}"
            elif (why := fits(cfg.pattern, t.shape2d())) is not None:
                rep.excluded[t.name] = f"{why}: left dense (pattern {cfg.pattern})"
            elif t.groups > 1 and cfg.method in ACTIVATION_METHODS:
                rep.excluded[t.name] = (f"grouped conv (groups={t.groups}): {cfg.method} needs "
                                        "groups=1, left dense")
            else:
                # One reduction: a NaN/inf weight makes the sum non-finite (the full scan runs only
                # then, since huge finite weights can overflow the sum too).
                w = t.module.weight.detach()
                if not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
                    raise ConfigError(f"weight {t.param_name!r} holds NaN/inf: fix the model or "
                                      f"exclude it with exclude=[{t.name!r}]")
                active.append(t)
        for e in self.exclude or []:
            if e not in used:
                rep.notes.append(f"exclude pattern {e!r} matched no prunable layer")
        if not active:
            raise ConfigError("no layer left to sparsify: " + "; ".join(
                f"{k}: {v}" for k, v in rep.excluded.items()) + " (check pattern and exclude)")
        return active

    # --- per-layer solve -------------------------------------------------------------------
    def _group(self) -> str:
        cfg = self.cfg
        if isinstance(cfg.pattern, NM):
            return "N:M groups"
        if cfg.scope == "global":
            return "global"
        if isinstance(cfg.pattern, Block):
            return "blocks/layer"
        return "row" if cfg.method == "wanda" else "layer"

    def _prior2d(self, t: Target) -> torch.Tensor | None:
        m = self.prior.get(t.param_name)
        if m is None:
            return None
        return m.t() if t.transposed else m.reshape(m.shape[0], -1)

    def _scores(self, t: Target, st: LayerStats | None) -> torch.Tensor:
        w2, m = t.weight2d(), self.cfg.method
        if m == "magnitude":
            return magnitude_scores(w2)
        if m == "random":
            return random_scores(w2, self.gen)
        if st is None or st.n == 0:
            raise ConfigError(f"layer {t.name!r} did not run on any calib batch: method {m!r} "
                              f"has no statistics for it; exclude it with exclude=[{t.name!r}]")
        if m == "wanda":
            return wanda_scores(w2, st.sq)
        return obd_scores(w2, 2.0 * st.sq / st.n)  # obd

    def _with_prior(self, t: Target, s: torch.Tensor) -> torch.Tensor:
        p = self._prior2d(t)
        return s if p is None else torch.where(p, s, torch.full_like(s, -math.inf))

    def _solve_layer(self, t: Target, st: LayerStats | None) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        sparsity = self.layer_sparsity.get(t.name, cfg.sparsity)
        if cfg.method == "sparsegpt":
            if st is None or st.n == 0:
                self._scores(t, st)  # raises the shared "did not run" error
            new, keep = sparsegpt_prune(t.weight2d(), st.H, cfg.pattern, sparsity,
                                        cfg.blocksize, cfg.percdamp, self._prior2d(t))
        else:
            s = self._with_prior(t, self._scores(t, st))
            keep = select_mask(s, cfg.pattern, sparsity, self._group())
            if cfg.refine == "dsnot":
                keep = dsnot_refine(t.weight2d(), keep, s, st.mean, st.var)
            new = None
            if cfg.update == "obs":
                if st is None or st.n == 0:
                    self._scores(t, st)
                new, keep = sparsegpt_prune(t.weight2d(), st.H, cfg.pattern, sparsity,
                                            cfg.blocksize, cfg.percdamp, fixed_keep=keep)
        self._apply(t, keep, new, st, time.perf_counter() - t0)

    def _apply(self, t: Target, keep, new, st, seconds) -> None:
        p = self._prior2d(t)
        if p is not None:
            keep = keep & p
        x = st.sample() if st is not None else None
        # The old weights are kept only for the error report, which needs calibration rows.
        old = t.weight2d().clone() if x is not None else t.weight2d()
        w2 = (new if new is not None else old) * keep
        with torch.no_grad():
            t.module.weight.copy_(t.to_param_shape(w2.to(old.dtype)))
        self.masks[t.param_name] = t.to_param_shape(keep)
        self.report.layers.append(LayerSparsity(
            t.param_name, tuple(t.module.weight.shape), int(keep.sum()), keep.numel(),
            check_mask(keep, self.cfg.pattern), self._group(),
            relative_error(old, w2, x), seconds))

    # --- strategies ------------------------------------------------------------------------
    def _sequential(self, active, blocks) -> bool:
        bname, blist = blocks
        try:
            seq = SequentialBlocks(self.work, blist, self.calib)
        except BlocksDoNotChain as e:
            self.report.notes.append(f"sequential calibration unavailable ({e}); whole-model")
            return False
        hess = self.cfg.method == "sparsegpt" or self.cfg.update == "obs"
        per_block = [[t for t in active if t.name.startswith(f"{bname}.{i}.")]
                     for i in range(len(blist))]
        inside = {t.name for b in per_block for t in b}
        outside = [t for t in active if t.name not in inside]
        if self.cfg.allocation == "owl":
            self._owl(seq, blist, per_block)
            seq.restart()
        st_out = collect_whole(self.work, outside, self.calib, hess) if outside else {}
        for i, tb in enumerate(per_block):
            if tb:
                st = seq.calibrate(i, tb, hess)
                for t in tb:
                    self._solve_layer(t, st[t.name])
            if i + 1 < len(blist):
                seq.advance(i)
        for t in outside:
            self._solve_layer(t, st_out[t.name])
        self.report.calibration = f"sequential over {bname} ({len(blist)} blocks)"
        return True

    def _owl(self, seq: SequentialBlocks, blist, per_block) -> None:
        """OWL: outlier ratio of each block's Wanda scores on the dense model, then ratios."""
        cfg = self.cfg
        ratios, sizes, named = [], [], []
        for i, tb in enumerate(per_block):
            if tb:
                st = seq.calibrate(i, tb, False)
                ratios.append(outlier_ratio([wanda_scores(t.weight2d(), st[t.name].sq)
                                             for t in tb], OWL_M))
                sizes.append(sum(t.weight2d().numel() for t in tb))
                named.append((i, tb))
            if i + 1 < len(blist):
                seq.advance(i)
        per = owl_sparsities(ratios, sizes, cfg.sparsity, OWL_LAMBDA)
        for (i, tb), s in zip(named, per):
            for t in tb:
                self.layer_sparsity[t.name] = s
        self.report.notes.append(
            f"OWL (M={OWL_M:g}, lambda={OWL_LAMBDA:g}): block outlier ratios "
            + ", ".join(f"{r:.4f}" for r in ratios) + "; block sparsities "
            + ", ".join(f"{s:.3f}" for s in per))

    def _one_shot(self, active) -> None:
        cfg = self.cfg
        st = {}
        if self.calib is not None and cfg.method not in LOSS_METHODS:
            st = collect_whole(self.work, [t for t in active if t.groups == 1], self.calib,
                               cfg.method == "sparsegpt" or cfg.update == "obs")
            self.report.calibration = "whole-model hooks"
        if cfg.method == "sparsegpt" or (cfg.scope == "layer" and cfg.method not in (
                "synflow", *LOSS_METHODS)):
            for t in active:
                self._solve_layer(t, st.get(t.name))
            return
        t0 = time.perf_counter()
        if cfg.method in LOSS_METHODS:
            scores = gradient_scores(self.work, active, self.calib, self.loss_fn, cfg.method)
            self.report.calibration = "whole-model gradients"
        elif cfg.method == "synflow":
            keep = self._synflow(active)
            dt = (time.perf_counter() - t0) / len(active)
            for t in active:
                self._apply(t, keep[t.name], None, st.get(t.name), dt)
            return
        else:
            scores = {t.name: self._scores(t, st.get(t.name)) for t in active}
        scores = {t.name: self._with_prior(t, scores[t.name]) for t in active}
        keep = self._select(scores, cfg.sparsity)
        dt = (time.perf_counter() - t0) / len(active)
        for t in active:
            self._apply(t, keep[t.name], None, st.get(t.name), dt)

    def _select(self, scores, sparsity) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.scope == "global":
            return select_global(scores, cfg.pattern, sparsity, cfg.min_keep)
        return {k: select_mask(s, cfg.pattern, sparsity, self._group())
                for k, s in scores.items()}

    def _synflow(self, active) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        flow = SynFlow(self.work, [t.name for t in active], self.example_inputs)
        keep = {t.name: p for t in active if (p := self._prior2d(t)) is not None} or None
        for k in range(1, cfg.iterations + 1):
            # Exponential schedule: density (1 - s)^(k / n), as in Tanaka et al. (2020).
            s_k = 1.0 - (1.0 - cfg.sparsity) ** (k / cfg.iterations)
            keep = self._select(flow.scores(keep), s_k)
        self.report.calibration = f"data-free ({cfg.iterations} SynFlow rounds)"
        return keep

    def run(self, inplace: bool) -> SparsifyResult:
        t0 = time.perf_counter()
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.masks: dict[str, torch.Tensor] = {}
        self.layer_sparsity: dict[str, float] = {}
        self.work = copy.deepcopy(self.user_model).eval()
        active = self._select_targets()
        cfg = self.cfg
        blocks = find_blocks(self.work, active)
        done = False
        if cfg.scope == "layer" and cfg.method in ACTIVATION_METHODS + (
                ("magnitude",) if cfg.update else ()) and blocks is not None:
            done = self._sequential(active, blocks)
        if cfg.allocation == "owl" and not done:
            raise ConfigError("allocation='owl' needs a model with repeated blocks (an "
                              "nn.ModuleList of transformer layers) that chain")
        if not done:
            self._one_shot(active)
        self.report.seconds = time.perf_counter() - t0
        if not inplace:
            self.work.train(self.user_model.training)
            return SparsifyResult(self.work, self.masks, self.report)
        mods = dict(self.user_model.named_modules())
        with torch.no_grad():
            for t in active:
                mods[t.name].weight.copy_(t.module.weight)
        return SparsifyResult(self.user_model, self.masks, self.report)
