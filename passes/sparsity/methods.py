"""Sparsity criteria: each turns a layer (and calibration facts) into scores, or into a mask.

Higher score = more important = kept. All scores live on the 2-D ``(out, reduction)`` view.

==========  ==========================================================  ======================
method      score                                                       needs
==========  ==========================================================  ======================
magnitude   ``|W|``                                                     nothing
random      uniform noise from a seeded generator                       nothing
wanda       ``|W_ij| * ||X_j||_2``, compared per output row             calib (Sun et al. 2023)
obd         ``W_ij^2 * H_jj / 2`` with ``H = 2 X^T X / n``              calib (LeCun et al. 1990)
sparsegpt   OBS mask + weight reconstruction, ``H = 2 X^T X / n``       calib (Frantar 2023)
taylor      ``mean_b (g_ij W_ij)^2`` over calibration batches           calib + loss (Molchanov)
snip        ``|W_ij * sum_b g_ij|``                                     calib + loss (Lee 2019)
grasp       ``W_ij * (H g)_ij`` (loss at temperature 200)               calib + loss (Wang 2020)
synflow     ``|W_ij * dR/dW_ij|``, ``R = sum f_|W|(1)``, iterated       input shape only (2020)
==========  ==========================================================  ======================

OBD here uses the layer-wise reconstruction Hessian (the one SparseGPT inverts); for that loss
its diagonal is ``2 ||X_j||^2 / n``, so within a row OBD ranks like Wanda squared. The two
differ in comparison group (OBD: whole layer, Wanda: per row).

The gradient methods follow the Synaptic-Flow reference pruners (ganguli-lab/Synaptic-Flow).
SparseGPT follows IST-DASLab/sparsegpt ``fasterprune``, except that (a) unstructured counts are
spread over column blocks so the layer prunes exactly ``round(s * numel)`` and (b) columns never
active in calibration keep their weights (the reference zeroes them, which would change the
layer for inputs calibration did not cover).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphprune.ir.errors import ConfigError
from graphprune.passes.sparsity.patterns import NM, Pattern, Unstructured, prune_count
from graphprune.passes.sparsity.targets import Target, call_model, find_targets

__all__ = [
    "METHODS",
    "ACTIVATION_METHODS",
    "LOSS_METHODS",
    "magnitude_scores",
    "random_scores",
    "wanda_scores",
    "obd_scores",
    "sparsegpt_prune",
    "gradient_scores",
    "SynFlow",
    "classification_loss",
]

ACTIVATION_METHODS = ("wanda", "obd", "sparsegpt")
LOSS_METHODS = ("taylor", "snip", "grasp")
METHODS = ("magnitude", "random", "synflow", *ACTIVATION_METHODS, *LOSS_METHODS)


def magnitude_scores(w2d: torch.Tensor) -> torch.Tensor:
    return w2d.abs().float()


def random_scores(w2d: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(w2d.shape, generator=gen)


def wanda_scores(w2d: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` with ``sq[j] = ||X_j||^2`` summed over calibration tokens."""
    return w2d.abs().float() * sq.sqrt().float().unsqueeze(0)


def obd_scores(w2d: torch.Tensor, hdiag: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Damage saliency ``w^2 H_jj / 2`` for a given Hessian diagonal."""
    return 0.5 * w2d.float() ** 2 * hdiag.float().unsqueeze(0)


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U``); damping grows 10x on failure.

    The reference code inverts and factors again (``cholesky_inverse`` then ``cholesky``). With
    ``J`` the order-reversing permutation and ``J H J = L L^T``, ``U = J L^-1 J`` is the same
    factor (unique with a positive diagonal) from one factorisation and one triangular solve,
    about 10-50x faster on CPU for the 1536-wide MiniLM FFN.
    """
    n = H.shape[0]
    idx = torch.arange(n)
    mean_diag = torch.mean(torch.diag(H)).item()
    for attempt in range(3):
        Hd = H.clone()
        Hd[idx, idx] += percdamp * (10**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=H.dtype), upper=False)
            return Linv.flip(0, 1)
    raise ConfigError(
        f"sparsegpt: calibration Hessian is not positive definite even with damping "
        f"{percdamp * 100}x; raise percdamp (e.g. 0.1) or give more calibration data"
    )


def _obs_block_errors(W1: torch.Tensor, U: torch.Tensor, prune: torch.Tensor,
                      sub: int = 32) -> torch.Tensor:
    """SparseGPT's column-by-column OBS errors for one block with a fixed mask, all at once.

    With ``U`` the block's upper Cholesky factor of ``H^-1`` and ``p`` a row's prune mask, the
    reference loop computes ``e_i = p_i / U_ii * (w_i - sum_{k<i} e_k U_ki)``. For each row that
    is the upper-triangular system ``e (diag(U) + strict_upper(U) diag(p)) = w diag(p)``, solved
    batched over rows in ``sub``-column pieces (each piece's errors update the later columns with
    one matmul): the same numbers without a Python step per column.
    """
    rows, n = W1.shape
    W1 = W1.clone()
    p = prune.to(W1.dtype)
    err = torch.empty_like(W1)
    for j1 in range(0, n, sub):
        j2 = min(j1 + sub, n)
        Ub = U[j1:j2, j1:j2]
        pb = p[:, j1:j2]
        # (rows, b, b): diag(U) plus the strict upper part with column k scaled by p_k.
        A = torch.diag_embed(torch.diag(Ub).expand(rows, -1)) + torch.triu(Ub, 1) * pb.unsqueeze(1)
        e = torch.linalg.solve_triangular(A, (W1[:, j1:j2] * pb).unsqueeze(1), upper=True,
                                          left=False).squeeze(1)
        err[:, j1:j2] = e
        if j2 < n:
            W1[:, j2:] -= e @ U[j1:j2, j2:]
    return err


def sparsegpt_prune(
    w2d: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    prior_keep: torch.Tensor | None = None,
    fixed_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT one-shot prune of one layer: returns ``(new_weight2d, keep_mask)``.

    ``H`` is ``X^T X`` (any positive scale). Columns are processed left to right in blocks of
    ``blocksize`` (rounded down to a multiple of M for N:M); each pruned weight's error is
    propagated to the not-yet-processed columns through the inverse Hessian (OBS update).
    With ``fixed_keep`` the mask is given (e.g. Wanda's) and only the weights are updated: the
    SparseGPT reconstruction applied to another criterion's mask (``update="obs"``).
    """
    if fixed_keep is None and not isinstance(pattern, (Unstructured, NM)):
        raise ConfigError(f"method='sparsegpt' supports 'unstructured' and 'N:M', not {pattern}")
    W = w2d.detach().clone().float()
    rows, cols = W.shape
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    Hinv = _inverse_cholesky(H, percdamp)
    if isinstance(pattern, NM) and fixed_keep is None:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if fixed_keep is not None:
            prune1 = ~fixed_keep[:, i1:i2]
            Err1 = _obs_block_errors(W1, Hinv1, prune1)
        elif isinstance(pattern, Unstructured):
            # Exact layer count, spread so each column block prunes its share.
            k = prune_count(sparsity, rows * i2) - prune_count(sparsity, rows * i1)
            tmp = W1**2 / d.unsqueeze(0) ** 2
            if prior_keep is not None:
                tmp[~prior_keep[:, i1:i2]] = -math.inf
            if k > 0:
                idx = torch.topk(tmp.reshape(-1), k, largest=False).indices
                prune1.view(-1)[idx] = True
            Err1 = _obs_block_errors(W1, Hinv1, prune1)
        else:
            scale = prune1.float()
            for i in range(i2 - i1):
                if i % pattern.m == 0:
                    tmp = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                    if prior_keep is not None:
                        tmp[~prior_keep[:, i1 + i : i1 + i + pattern.m]] = -math.inf
                    idx = torch.topk(tmp, pattern.m - pattern.n, dim=1, largest=False).indices
                    prune1.scatter_(1, i + idx, True)
                    scale[:, i : i + pattern.m] = prune1[:, i : i + pattern.m].float() / d[
                        i : i + pattern.m
                    ].unsqueeze(0)
                # OBS step for column i: its pruned entries' error, spread over later columns
                # (the update also sets column i itself to its quantised value, 0 or kept).
                err = W1[:, i] * scale[:, i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
                Err1[:, i] = err
        W[:, i1:i2] = W1 if isinstance(pattern, NM) and fixed_keep is None else W1 - Err1 @ Hinv1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[~keep] = 0.0
    return W.to(w2d.dtype), keep


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Default ``loss_fn``: ``batch = (inputs, int labels)``, cross-entropy on ``model(inputs)``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point()):
        raise ConfigError(
            "loss-based methods (taylor, snip, grasp) need a loss: pass loss_fn=f(model, batch) "
            "-> scalar tensor, or calib batches of (inputs, integer labels) for cross-entropy"
        )
    return nn.functional.cross_entropy(call_model(model, batch[0]), batch[1])


class _Tempered(nn.Module):
    """Divides tensor outputs by a temperature (GraSP's T=200 keeps the Hessian term stable)."""

    def __init__(self, inner: nn.Module, temp: float):
        super().__init__()
        self.inner, self.temp = inner, temp

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out / self.temp if isinstance(out, torch.Tensor) else out


def _loss(loss_fn, model, batch) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError("loss_fn must return a scalar tensor")
    if not torch.isfinite(loss):
        raise ConfigError("loss_fn returned NaN/inf on a calibration batch; check calib and model")
    return loss.reshape(())


def gradient_scores(model: nn.Module, targets: list[Target], calib: list, loss_fn,
                    method: str) -> dict[str, torch.Tensor]:
    """Taylor / SNIP / GraSP scores (2-D views) on ``model`` (a working copy: grads are set)."""
    loss_fn = loss_fn or classification_loss
    params = [t.module.weight for t in targets]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)

    def grads(loss, create_graph=False):
        g = torch.autograd.grad(loss, params, allow_unused=True, create_graph=create_graph)
        return [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]

    try:
        if method == "grasp":
            return _grasp(model, targets, calib, loss_fn, params, grads)
        acc = [torch.zeros_like(p) for p in params]
        for b in calib:
            for a, g, p in zip(acc, grads(_loss(loss_fn, model, b)), params):
                a += (g * p.detach()) ** 2 if method == "taylor" else g
        if method == "taylor":
            raw = [a / len(calib) for a in acc]
        else:
            raw = [(a * p.detach()).abs() for a, p in zip(acc, params)]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return _as2d(targets, raw, method)


def _as2d(targets, raw, method) -> dict[str, torch.Tensor]:
    out = {}
    for t, r in zip(targets, raw):
        r2 = r.t() if t.transposed else r.reshape(r.shape[0], -1)
        if not torch.isfinite(r2).all():
            raise ConfigError(f"method={method!r}: scores of {t.name!r} are NaN/inf")
        out[t.name] = r2.detach().float()
    return out


def _grasp(model, targets, calib, loss_fn, params, grads) -> dict[str, torch.Tensor]:
    # GraSP needs a Hessian-vector product (double backward); fused CPU attention kernels have
    # no double backward, so attention runs through the math path here.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        tm = _Tempered(model, 200.0)
        stopped = [torch.zeros_like(p) for p in params]
        for b in calib:
            for s, g in zip(stopped, grads(_loss(loss_fn, tm, b))):
                s += g.detach()
        hg = [torch.zeros_like(p) for p in params]
        for b in calib:
            g = grads(_loss(loss_fn, tm, b), create_graph=True)
            z = sum((s * gi).sum() for s, gi in zip(stopped, g))
            for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
                if h is not None:
                    acc += h.detach()
        raw = [p.detach() * h for p, h in zip(params, hg)]
    return _as2d(targets, raw, "grasp")


def _ones_like_inputs(x):
    if isinstance(x, torch.Tensor):
        return torch.ones_like(x, dtype=torch.float64) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _ones_like_inputs(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_ones_like_inputs(v) for v in x)
    return x


class SynFlow:
    """SynFlow rounds on a linearised float64 copy: scores ``|W * dR/dW|``, ``R = sum f(1)``.

    Only the inputs' shapes (and integer ids, e.g. token ids) are used, never their values: the
    criterion is data-free. The copy's parameters and buffers are replaced by their absolute
    values once; each round multiplies the target weights by the current masks.
    ``flatten_outputs`` (the frontend's) turns what the model returns into a list of tensors;
    ``R`` sums the first.
    """

    def __init__(self, model: nn.Module, names: list[str], example_inputs,
                 flatten_outputs: Callable[[Any], list[torch.Tensor]]):
        self.model = copy.deepcopy(model).double().eval()
        self.flatten_outputs = flatten_outputs
        with torch.no_grad():
            for v in self.model.state_dict().values():
                if v.is_floating_point():
                    v.abs_()
        by_name = {t.name: t for t in find_targets(self.model)}
        self.targets = [by_name[n] for n in names]
        self.base = [t.module.weight.detach().clone() for t in self.targets]
        self.inputs = _ones_like_inputs(example_inputs)
        for t in self.targets:
            t.module.weight.requires_grad_(True)

    def scores(self, masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for t, b in zip(self.targets, self.base):
                m = masks.get(t.name) if masks else None
                w = b if m is None else b * t.to_param_shape(m).to(b.dtype)
                t.module.weight.copy_(w)
        params = [t.module.weight for t in self.targets]
        out = self.flatten_outputs(call_model(self.model, self.inputs))[0]
        g = torch.autograd.grad(out.sum(), params, allow_unused=True)
        res = {}
        for t, p, gi in zip(self.targets, params, g):
            s = torch.zeros_like(p) if gi is None else (gi * p).abs()
            # Kept in float64: SynFlow products span hundreds of orders of magnitude.
            res[t.name] = (s.t() if t.transposed else s.reshape(s.shape[0], -1)).detach()
        return res
