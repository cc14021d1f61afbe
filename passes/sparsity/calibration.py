"""Calibration statistics for the sparsity methods: per-layer input norms, Hessians and samples.

For a layer ``y = W x`` the methods need, over the calibration tokens X (rows of the reduction
dimension, im2col for convs):

- ``sq[j] = sum_t x_tj^2`` (Wanda's ``||X_j||^2``; OBD's Hessian diagonal is ``2 sq / n``),
- ``H = X^T X`` when SparseGPT asks for it (the layer-wise Hessian is ``2 H / n``),
- ``s1[j] = sum_t x_tj`` (DSnoT's expected input ``E[X_j] = s1 / n``),
- a few hundred rows of X, to report the layer's relative reconstruction error.

Two ways to collect them:

- ``collect_whole``: forward hooks on the targets while the whole model runs each batch.
- ``SequentialBlocks``: for transformer stacks (an ``nn.ModuleList`` of blocks), the inputs of
  block 0 are captured once; each block is then calibrated on inputs produced by the
  already-sparsified blocks before it, pruned, and re-run to feed the next block. Memory stays
  bounded by one block's activations, as in the SparseGPT and Wanda reference code.

Padding: when a calibration batch is a dict with a 2-D ``attention_mask`` (Hugging Face
tokenizers' output), only the rows of real tokens enter the statistics. Padded positions still
run through the model (batching needs them) but their activations are artefacts of the padding;
letting them into ``||X_j||`` or ``X^T X`` would weight the criteria by how much padding a batch
happened to need. Layers whose input is not ``(batch, seq, ...)`` with the mask's leading shape
(convolutions, pooled heads) take all their rows.

Each batch's sums are kept apart and folded into float64 totals in batch order
(:class:`LayerStats`); a :class:`BatchReduce` decides which batches this process runs and how the
partials are folded (one process here; every rank's, in batch order, for a distributed run).

Non-finite activations raise :class:`ConfigError` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from graphprune.ir.errors import ConfigError

from graphprune.passes.sparsity.targets import Target, call_model

__all__ = [
    "BatchPartial",
    "BatchReduce",
    "LayerStats",
    "collect_whole",
    "SequentialBlocks",
    "BlocksDoNotChain",
    "token_mask",
]

_SAMPLE_ROWS = 512  # rows of X kept per layer for the reconstruction-error report


@dataclass
class BatchPartial:
    """One calibration batch's contribution to a layer's statistics (all the hook calls of that
    batch): ``sq``/``s1`` in float64, ``H`` in float32 (one batch's rows), sample candidates."""

    n: int = 0
    sq: torch.Tensor | None = None
    s1: torch.Tensor | None = None
    H: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LayerStats:
    """Totals over the calibration batches, folded one batch at a time in batch order.

    Each batch's partial sums are kept apart (``part``) until :meth:`end_batch` adds them to the
    float64 totals. Floating-point addition is not associative: folding per-batch partials in
    batch order is what lets a distributed run (:mod:`graphprune.passes.sparsity.distributed`,
    which gathers the partials of the batches other ranks ran) reach bit-identical totals.
    """

    red: int
    want_hessian: bool
    n: int = 0
    sq: torch.Tensor | None = None  # sum of x_j^2 (float64)
    s1: torch.Tensor | None = None  # sum of x_j (float64)
    H: torch.Tensor | None = None  # X^T X (float64)
    samples: list[torch.Tensor] = field(default_factory=list)
    part: BatchPartial | None = None  # the batch running now

    def add(self, x2: torch.Tensor, name: str) -> None:
        x2 = x2.float()
        sq = (x2 * x2).sum(0)
        # One reduction checks finiteness: a NaN/inf input makes its column's sum non-finite.
        # Only then is the whole input scanned (a huge finite value may overflow fp32 squares).
        if not torch.isfinite(sq).all():
            if not torch.isfinite(x2).all():
                raise ConfigError(
                    f"calibration: input of layer {name!r} holds NaN/inf; check calib batches "
                    "and the layers before it (or exclude it with exclude=[...])"
                )
            sq = (x2.double() ** 2).sum(0)
        p = self.part
        if p is None:
            z = torch.zeros(self.red, dtype=torch.float64)
            p = self.part = BatchPartial(0, z, z.clone())
        p.sq += sq
        p.s1 += x2.sum(0)
        if self.want_hessian:
            if p.H is None:
                p.H = torch.zeros(self.red, self.red)
            p.H.addmm_(x2.t(), x2)
        p.n += x2.shape[0]
        if self.kept + sum(r.shape[0] for r in p.rows) < _SAMPLE_ROWS:
            step = max(1, x2.shape[0] // (_SAMPLE_ROWS // 4))
            p.rows.append(x2[::step][:_SAMPLE_ROWS].clone())

    @property
    def kept(self) -> int:
        return sum(s.shape[0] for s in self.samples)

    @property
    def wants_samples(self) -> bool:
        """Whether the report's sample of input rows is still short of its size."""
        return self.kept < _SAMPLE_ROWS

    def end_batch(self) -> None:
        """Fold the running batch's partial into the totals."""
        part, self.part = self.part, None
        if part is not None:
            self.fold(part)

    def fold(self, part: BatchPartial) -> None:
        """Add one batch's partial to the totals (callers fold batches in batch order)."""
        if part.n == 0:
            return
        if self.sq is None:
            self.sq = torch.zeros(self.red, dtype=torch.float64)
            self.s1 = torch.zeros(self.red, dtype=torch.float64)
        self.sq += part.sq
        self.s1 += part.s1
        if self.want_hessian:
            if self.H is None:
                self.H = torch.zeros(self.red, self.red, dtype=torch.float64)
            self.H += part.H
        self.n += part.n
        for r in part.rows:
            kept = self.kept
            if kept < _SAMPLE_ROWS:
                self.samples.append(r[: _SAMPLE_ROWS - kept])

    @property
    def mean(self) -> torch.Tensor:
        """Per-column mean of the layer input over calibration tokens (DSnoT's ``E[X_j]``)."""
        return self.s1 / self.n

    @property
    def var(self) -> torch.Tensor:
        """Per-column variance of the layer input (population, over calibration tokens)."""
        return (self.sq / self.n - self.mean**2).clamp_min(0.0)

    def sample(self) -> torch.Tensor | None:
        return torch.cat(self.samples) if self.samples else None


def token_mask(batch) -> torch.Tensor | None:
    """Bool ``(batch, seq)`` mask of real tokens for a dict batch with an ``attention_mask``."""
    if isinstance(batch, torch.Tensor) or not hasattr(batch, "keys"):
        return None
    m = batch.get("attention_mask")
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        return None
    return m.bool()


class _Tokens:
    """The real-token mask of the batch running now (shared by the hooks of one collection)."""

    current: torch.Tensor | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.current
        if m is not None and x.dim() >= 3 and x.shape[:2] == m.shape:
            return x[m]
        return x


def _hook(t: Target, st: LayerStats, tokens: _Tokens):
    def hook(mod, args, out):
        st.add(t.inputs2d(tokens.rows(args[0].detach())), t.name)

    return hook


def _attach(targets: list[Target], want_hessian: bool, tokens: _Tokens):
    # Grouped convs never get here: their im2col rows span all groups (callers filter them).
    stats = {t.name: LayerStats(t.shape2d()[1], want_hessian) for t in targets}
    hooks = [t.module.register_forward_hook(_hook(t, stats[t.name], tokens)) for t in targets]
    return stats, hooks


class BatchReduce:
    """How the batches' partial statistics become totals. This one: one process runs every
    batch and folds each as it ends. :class:`graphprune.passes.sparsity.distributed.Ranks`
    runs a share of the batches and folds every rank's partials in the same batch order."""

    def local(self, calib: list) -> list:
        """The batches this process runs."""
        return list(calib)

    def after_batch(self, stats: dict[str, LayerStats], error: BaseException | None) -> None:
        """Called after each local batch, with the exception its forward raised (if any)."""
        if error is not None:
            raise error
        for st in stats.values():
            st.end_batch()

    def finish(self, stats: dict[str, LayerStats], ran: int) -> None:
        """Called once after ``ran`` local batches."""


def _each_batch(batches: list, masks: list, stats, tokens: _Tokens, reduce: BatchReduce,
                run) -> None:
    """``run(batch)`` for each local batch, handing each batch's outcome to ``reduce``."""
    for b, m in zip(batches, masks):
        tokens.current = m
        err = None
        try:
            run(b)
        except Exception as e:  # noqa: BLE001 - re-raised by reduce (on every rank)
            err = e
        reduce.after_batch(stats, err)
    reduce.finish(stats, len(batches))


def collect_whole(model: nn.Module, targets: list[Target], calib: list,
                  want_hessian: bool, reduce: BatchReduce | None = None) -> dict[str, LayerStats]:
    """Run every calibration batch through ``model`` with hooks on ``targets``."""
    reduce = reduce or BatchReduce()
    tokens = _Tokens()
    stats, hooks = _attach(targets, want_hessian, tokens)
    batches = reduce.local(calib)
    try:
        with torch.no_grad():
            _each_batch(batches, [token_mask(b) for b in batches], stats, tokens, reduce,
                        lambda b: call_model(model, b))
    finally:
        for h in hooks:
            h.remove()
    return stats


class _Stop(Exception):
    pass


class BlocksDoNotChain(Exception):
    """A block's output cannot be fed as the next block's input (caller falls back)."""


class SequentialBlocks:
    """Walk a block list: calibrate block i on outputs of the sparsified blocks 0..i-1."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, calib: list,
                 reduce: BatchReduce | None = None):
        self.blocks = blocks
        self.reduce = reduce or BatchReduce()
        calib = self.reduce.local(calib)
        self.cached: list[tuple[tuple, dict]] = []
        self.masks = [token_mask(b) for b in calib]

        def pre(mod, args, kwargs):
            kwargs = dict(kwargs)
            # A KV cache (transformers' DynamicCache, use_cache=True) would grow each time a
            # block re-runs on these kwargs (calibrate, then advance): the second run would
            # attend over the first run's stale keys. Blocks run here without one.
            for k, v in kwargs.items():
                if hasattr(v, "get_seq_length") and hasattr(v, "update"):  # a Cache, any name
                    kwargs[k] = None
            self.cached.append((args, kwargs))
            raise _Stop

        h = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                for b in calib:
                    try:
                        call_model(model, b)
                    except _Stop:
                        pass
        finally:
            h.remove()
        if len(self.cached) != len(calib):
            raise BlocksDoNotChain("block 0 did not run once per calibration batch")
        # Dry run on one batch: blocks of one type chain for all if block 0 does.
        saved = self.cached
        self.cached = saved[:1]
        try:
            self._run(0)
        finally:
            self.cached = saved
        self._first = saved

    def restart(self) -> None:
        """Back to block 0's captured inputs (after a dense pass, e.g. OWL's outlier count)."""
        self.cached = self._first

    def calibrate(self, i: int, targets: list[Target], want_hessian: bool):
        tokens = _Tokens()
        stats, hooks = _attach(targets, want_hessian, tokens)
        try:
            with torch.no_grad():
                _each_batch(self.cached, self.masks, stats, tokens, self.reduce,
                            lambda c: self.blocks[i](*c[0], **c[1]))
        finally:
            for h in hooks:
                h.remove()
        return stats

    def advance(self, i: int) -> None:
        """Re-run (now sparsified) block ``i`` to produce the next block's inputs."""
        self._run(i)

    @staticmethod
    def _hidden(args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return kwargs["hidden_states"]
        raise BlocksDoNotChain("block input has no leading tensor or hidden_states kwarg")

    def _run(self, i: int) -> None:
        nxt = []
        with torch.no_grad():
            for args, kwargs in self.cached:
                out = self.blocks[i](*args, **kwargs)
                h = out[0] if isinstance(out, (tuple, list)) else out
                old = self._hidden(args, kwargs)
                if not isinstance(h, torch.Tensor) or h.shape != old.shape:
                    raise BlocksDoNotChain(f"block {i} output does not match its input")
                if args and isinstance(args[0], torch.Tensor):
                    nxt.append(((h,) + tuple(args[1:]), kwargs))
                else:
                    nxt.append((args, {**kwargs, "hidden_states": h}))
        self.cached = nxt
