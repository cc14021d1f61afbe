"""The sparsity pass for torch modules: weight masks (unstructured, N:M, block) and a report.

Pipeline position: the plan step of ``graphprune.sparsify`` (:mod:`graphprune.api.sparsify`),
between capture and write-back. :func:`compute_masks` picks the target layers
(:mod:`graphprune.passes.sparsity.targets`), gathers calibration statistics
(:mod:`graphprune.passes.sparsity.calibration`), scores weights with one of the criteria in
:mod:`graphprune.passes.sparsity.methods`, selects masks
(:mod:`graphprune.passes.sparsity.patterns`) and optionally refines them
(:mod:`graphprune.passes.sparsity.refine`: OWL per-block ratios, DSnoT mask swaps, SparseGPT's
OBS weight update applied to another criterion's mask). It returns
a :class:`~graphprune.passes.sparsity.report.MaskSet`; the API records the masks on the IR
(``PruneGraph.masks``) and the torch frontend writes them into the model.

Precondition: ``model`` is an ``nn.Module`` (the caller dispatched on the model's kind) and the
config was validated (:func:`graphprune.passes.sparsity.config.validate_config`). Calibration is
module-based: transformer stacks are calibrated block by block on the outputs of the blocks
already sparsified, so the pass works on its own deep copy of the model (masked weights are
written into that copy as it goes); the caller's model is never touched.

With ``inplace=True`` there is no copy (bounded memory for LLMs: the pass adds the masks, one
block's activations and statistics, and one block's weights on top of the model). Mask-only
methods then leave the weights as they were: a block is masked only while it runs to produce
the next block's inputs, and restored after, so a failure changes nothing; the caller writes
the masks. Methods that reconstruct weights (SparseGPT, ``update='obs'``) write each layer's new
weights into the model as they go (a second copy is what bounded memory rules out); a failure
after the first write says which layers were rewritten.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.calibration import (
    BlocksDoNotChain,
    LayerStats,
    SequentialBlocks,
    collect_whole,
)
from graphprune.passes.sparsity.config import SparsityConfig
from graphprune.passes.sparsity.distributed import Ranks, run_facts, solve_split
from graphprune.passes.sparsity.methods import (
    ACTIVATION_METHODS,
    LOSS_METHODS,
    SynFlow,
    gradient_scores,
    magnitude_scores,
    obd_scores,
    random_scores,
    sparsegpt_prune,
    wanda_scores,
)
from graphprune.passes.sparsity.patterns import (
    NM,
    Block,
    check_mask,
    fits,
    select_global,
    select_mask,
)
from graphprune.passes.sparsity.refine import dsnot_refine, outlier_ratio, owl_sparsities
from graphprune.passes.sparsity.report import LayerSparsity, MaskSet, SparsityReport, relative_error
from graphprune.passes.sparsity.targets import (
    Target,
    find_blocks,
    find_head,
    find_targets,
    is_embedding,
    match_exclude,
)

__all__ = ["compute_masks"]

OWL_M, OWL_LAMBDA = 5.0, 0.08  # outlier threshold (x mean score) and ratio spread: the paper's


def compute_masks(model: nn.Module, config: SparsityConfig, *, calib: list | None = None,
                  example_inputs: Any = None, exclude: list[str] | None = None, loss_fn=None,
                  prior_masks: dict[str, torch.Tensor] | None = None,
                  flatten_outputs: Callable[[Any], list[torch.Tensor]],
                  inplace: bool = False, ranks: Ranks | None = None) -> MaskSet:
    """Masks for the Linear / Conv1d / Conv2d / Conv1D weights of ``model``; ``model`` unchanged
    unless ``inplace`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Read only (a deep copy is calibrated and masked), unless ``inplace``.
    config : SparsityConfig
        From :func:`~graphprune.passes.sparsity.config.validate_config`, with ``calib`` as it
        returned it.
    example_inputs, exclude, loss_fn, prior_masks
        As :func:`graphprune.api.sparsify.sparsify` documents them; ``exclude`` validated.
    flatten_outputs : callable
        The frontend's flattening of a model's outputs into a list of tensors (SynFlow sums the
        first).
    inplace : bool
        Calibrate ``model`` itself (no copy). Its weights are unchanged on return for mask-only
        methods; reconstructed weights (``values``) are written into it and are its own
        parameters.
    ranks : Ranks, optional
        Run on every rank of a process group: calibration batches split across ranks, layers'
        solves too, results identical to one process
        (:mod:`graphprune.passes.sparsity.distributed`). Activation methods (and
        ``update='obs'``) only.

    Returns
    -------
    MaskSet
        ``masks`` by parameter name (bool, the parameter's shape), ``values`` for the layers whose
        kept weights were reconstructed (SparseGPT, ``update='obs'``), and the report.

    Examples
    --------
    >>> from graphprune.passes.sparsity.config import validate_config
    >>> lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cfg, _ = validate_config(pattern="2:4")
    >>> found = compute_masks(lin, cfg, flatten_outputs=list)
    >>> found.masks["0.weight"].float().mean().item(), list(found.report.excluded), found.values
    (0.5, ['2'], {})
    """
    if ranks is not None and config.method not in ACTIVATION_METHODS and config.update is None:
        raise ConfigError(f"distributed=True splits calibration statistics across ranks; method "
                          f"{config.method!r} has none to split: use wanda, obd or sparsegpt (or "
                          "update='obs'), or run it without distributed")
    sp = _Sparsifier(model, config, calib, example_inputs, exclude, loss_fn, prior_masks,
                     flatten_outputs, inplace)
    sp.ranks = ranks
    return sp.run()


class _Sparsifier:
    def __init__(self, model, cfg: SparsityConfig, calib, example_inputs, exclude, loss_fn, prior,
                 flatten_outputs, inplace=False):
        self.user_model, self.cfg, self.calib = model, cfg, calib
        self.inplace = inplace
        # Weights are written into the model being calibrated when it is the pass's own copy, or
        # when the method computes new weights (no room for a second copy of them).
        self.write_through = not inplace or cfg.method == "sparsegpt" or cfg.update == "obs"
        self.written: list[str] = []
        self.example_inputs, self.exclude, self.loss_fn = example_inputs, exclude, loss_fn
        self.prior = prior or {}
        self.flatten_outputs = flatten_outputs
        self.report = SparsityReport(cfg.method, str(cfg.pattern), cfg.scope, cfg.sparsity, "none")
        self.ranks: Ranks | None = None
        self.solved = 0  # layers solved so far (distributed: which rank solves the next one)

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

    def _solve_all(self, targets: list[Target], stats: dict[str, LayerStats]) -> None:
        """Solve and apply each target's mask; distributed, each rank solves its share."""
        if self.ranks is None:
            for t in targets:
                self._apply(t, *self._solve_layer(t, stats.get(t.name)))
            return
        recon = self.cfg.method == "sparsegpt" or self.cfg.update == "obs"
        shared = solve_split(self.ranks, self.solved, targets,
                             lambda t: self._solve_layer(t, stats.get(t.name)), recon)
        self.solved += len(targets)
        for t, sol in zip(targets, shared):
            self._apply(t, *sol)

    def _solve_layer(self, t: Target, st: LayerStats | None):
        """``(keep, new weights or None, seconds, report error)`` for one layer; nothing
        written. The report's error is computed here, by the rank that solves the layer (two
        matmuls of the sampled rows: as costly as a calibration batch, not worth repeating)."""
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
        return keep, new, time.perf_counter() - t0, self._error(t, keep, new, st)

    def _error(self, t: Target, keep, new, st) -> float | None:
        """Relative output error of the layer on the sampled calibration rows (the report's)."""
        x = st.sample() if st is not None else None
        if x is None:
            return None
        p = self._prior2d(t)
        old = t.weight2d()
        return relative_error(old, (new if new is not None else old) * (keep if p is None
                                                                          else keep & p), x)

    def _apply(self, t: Target, keep, new, seconds, error) -> None:
        p = self._prior2d(t)
        if p is not None:
            keep = keep & p
        old = t.weight2d()
        w2 = (new if new is not None else old) * keep
        if self.write_through:
            # Sequential calibration feeds the next block the outputs of this one as sparsified
            # (otherwise :meth:`_masked` masks the block while it runs).
            with torch.no_grad():
                t.module.weight.copy_(t.to_param_shape(w2.to(old.dtype)))
            self.written.append(t.param_name)
        self.masks[t.param_name] = t.to_param_shape(keep)
        if new is not None:
            self.values[t.param_name] = t.module.weight.detach()
        self.report.layers.append(LayerSparsity(
            t.param_name, tuple(t.module.weight.shape), int(keep.sum()), keep.numel(),
            check_mask(keep, self.cfg.pattern), self._group(), error, seconds))

    # --- strategies ------------------------------------------------------------------------
    def _sequential(self, active, blocks) -> bool:
        bname, blist = blocks
        try:
            seq = SequentialBlocks(self.work, blist, self.calib, self.ranks)
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
        st_out = (collect_whole(self.work, outside, self.calib, hess, self.ranks) if outside
                  else {})
        for i, tb in enumerate(per_block):
            if tb:
                self._solve_all(tb, seq.calibrate(i, tb, hess))
            if i + 1 < len(blist):
                self._masked(tb, lambda i=i: seq.advance(i))
        self._solve_all(outside, st_out)
        self.report.calibration = f"sequential over {bname} ({len(blist)} blocks)"
        return True

    def _masked(self, targets: list[Target], run: Callable[[], None]) -> None:
        """``run()`` with ``targets`` masked: a copy of their weights (one block's) is taken, the
        masks applied, and the weights restored after (when masks are not written through)."""
        if self.write_through:
            run()
            return
        saved = [t.module.weight.detach().clone() for t in targets]
        try:
            with torch.no_grad():
                for t in targets:
                    w = t.module.weight
                    w.mul_(self.masks[t.param_name].to(w.dtype))
            run()
        finally:
            with torch.no_grad():
                for t, w0 in zip(targets, saved):
                    t.module.weight.copy_(w0)

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
                               cfg.method == "sparsegpt" or cfg.update == "obs", self.ranks)
            self.report.calibration = "whole-model hooks"
        if cfg.method == "sparsegpt" or (cfg.scope == "layer" and cfg.method not in (
                "synflow", *LOSS_METHODS)):
            self._solve_all(active, st)
            return
        t0 = time.perf_counter()
        if cfg.method in LOSS_METHODS:
            scores = gradient_scores(self.work, active, self.calib, self.loss_fn, cfg.method)
            self.report.calibration = "whole-model gradients"
        elif cfg.method == "synflow":
            keep = self._synflow(active)
            dt = (time.perf_counter() - t0) / len(active)
            for t in active:
                self._apply(t, keep[t.name], None, dt,
                            self._error(t, keep[t.name], None, st.get(t.name)))
            return
        else:
            scores = {t.name: self._scores(t, st.get(t.name)) for t in active}
        scores = {t.name: self._with_prior(t, scores[t.name]) for t in active}
        keep = self._select(scores, cfg.sparsity)
        dt = (time.perf_counter() - t0) / len(active)
        for t in active:
            self._apply(t, keep[t.name], None, dt,
                            self._error(t, keep[t.name], None, st.get(t.name)))

    def _select(self, scores, sparsity) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.scope == "global":
            return select_global(scores, cfg.pattern, sparsity, cfg.min_keep)
        return {k: select_mask(s, cfg.pattern, sparsity, self._group())
                for k, s in scores.items()}

    def _synflow(self, active) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        flow = SynFlow(self.work, [t.name for t in active], self.example_inputs,
                       self.flatten_outputs)
        keep = {t.name: p for t in active if (p := self._prior2d(t)) is not None} or None
        for k in range(1, cfg.iterations + 1):
            # Exponential schedule: density (1 - s)^(k / n), as in Tanaka et al. (2020).
            s_k = 1.0 - (1.0 - cfg.sparsity) ** (k / cfg.iterations)
            keep = self._select(flow.scores(keep), s_k)
        self.report.calibration = f"data-free ({cfg.iterations} SynFlow rounds)"
        return keep

    def run(self) -> MaskSet:
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.masks: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.layer_sparsity: dict[str, float] = {}
        if not self.inplace:
            self.work = copy.deepcopy(self.user_model).eval()
            return self._run()
        self.work = self.user_model
        modes = {m: m.training for m in self.work.modules()}
        self.work.eval()
        try:
            return self._run()
        except ConfigError as e:
            if not self.written:
                raise
            raise ConfigError(
                f"{e} [inplace=True, method {self.cfg.method!r}: the new weights of "
                f"{len(self.written)} layers ({', '.join(self.written[:3])}, ...) were already "
                "written into the model; reload it before retrying]") from e
        finally:
            for m, mode in modes.items():
                m.training = mode

    def _run(self) -> MaskSet:
        t0 = time.perf_counter()
        active = self._select_targets()
        cfg = self.cfg
        if self.ranks is not None:
            self.ranks.check_same(run_facts(cfg, active, self.calib))
        blocks = find_blocks(self.work, active)
        done = False
        if cfg.scope == "layer" and cfg.method in ACTIVATION_METHODS + (
                ("magnitude",) if cfg.update else ()) and blocks is not None:
            done = self._sequential(active, blocks)
        if cfg.allocation == "owl" and not done:
            raise ConfigError("allocation='owl' needs a model with repeated blocks (an "
                              "nn.ModuleList of transformer layers) that chain")
        if not done and blocks is None and cfg.method in ACTIVATION_METHODS and self.calib:
            self.report.notes.append(
                "no block list (an nn.ModuleList of >= 2 blocks of one type holding the target "
                "layers) found: calibrated on the whole model at once, which holds every layer's "
                "statistics together (memory grows with the model, not with one block)")
        if not done:
            self._one_shot(active)
        self.report.seconds = time.perf_counter() - t0
        return MaskSet(self.masks, self.values, self.report)
