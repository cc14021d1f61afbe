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

Non-finite activations raise :class:`ConfigError` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from graphprune.ir.errors import ConfigError

from graphprune.passes.sparsity.targets import Target, call_model

__all__ = ["LayerStats", "collect_whole", "SequentialBlocks", "BlocksDoNotChain", "token_mask"]

_SAMPLE_ROWS = 512  # rows of X kept per layer for the reconstruction-error report


@dataclass
class LayerStats:
    red: int
    want_hessian: bool
    n: int = 0
    sq: torch.Tensor | None = None  # sum of x_j^2 (float64)
    s1: torch.Tensor | None = None  # sum of x_j (float64)
    H: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

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
        if self.sq is None:
            self.sq = torch.zeros(self.red, dtype=torch.float64)
            self.s1 = torch.zeros(self.red, dtype=torch.float64)
        self.sq += sq
        self.s1 += x2.sum(0)
        if self.want_hessian:
            if self.H is None:
                self.H = torch.zeros(self.red, self.red)
            self.H.addmm_(x2.t(), x2)
        self.n += x2.shape[0]
        kept = sum(s.shape[0] for s in self.samples)
        if kept < _SAMPLE_ROWS:
            step = max(1, x2.shape[0] // (_SAMPLE_ROWS // 4))
            self.samples.append(x2[::step][: _SAMPLE_ROWS - kept].clone())

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


def collect_whole(model: nn.Module, targets: list[Target], calib: list,
                  want_hessian: bool) -> dict[str, LayerStats]:
    """Run every calibration batch through ``model`` with hooks on ``targets``."""
    tokens = _Tokens()
    stats, hooks = _attach(targets, want_hessian, tokens)
    try:
        with torch.no_grad():
            for b in calib:
                tokens.current = token_mask(b)
                call_model(model, b)
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

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, calib: list):
        self.blocks = blocks
        self.cached: list[tuple[tuple, dict]] = []
        self.masks = [token_mask(b) for b in calib]

        def pre(mod, args, kwargs):
            self.cached.append((args, dict(kwargs)))
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
            self._run(0, keep=True)
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
            self._run(i, keep=False, tokens=tokens)
        finally:
            for h in hooks:
                h.remove()
        return stats

    def advance(self, i: int) -> None:
        """Re-run (now sparsified) block ``i`` to produce the next block's inputs."""
        self._run(i, keep=True)

    @staticmethod
    def _hidden(args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return kwargs["hidden_states"]
        raise BlocksDoNotChain("block input has no leading tensor or hidden_states kwarg")

    def _run(self, i: int, keep: bool, tokens: _Tokens | None = None) -> None:
        nxt = []
        with torch.no_grad():
            for (args, kwargs), mask in zip(self.cached, self.masks):
                if tokens is not None:
                    tokens.current = mask
                out = self.blocks[i](*args, **kwargs)
                if not keep:
                    continue
                h = out[0] if isinstance(out, (tuple, list)) else out
                old = self._hidden(args, kwargs)
                if not isinstance(h, torch.Tensor) or h.shape != old.shape:
                    raise BlocksDoNotChain(f"block {i} output does not match its input")
                if args and isinstance(args[0], torch.Tensor):
                    nxt.append(((h,) + tuple(args[1:]), kwargs))
                else:
                    nxt.append((args, {**kwargs, "hidden_states": h}))
        if keep:
            self.cached = nxt
