"""Padding-aware calibration, the fast SparseGPT solver, OBS update, DSnoT and OWL."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from graphprune.ir.errors import ConfigError
from graphprune.api.sparsify import sparsify
from graphprune.passes.sparsity.methods import _inverse_cholesky, sparsegpt_prune
from graphprune.passes.sparsity.patterns import NM, Unstructured, prune_count
from graphprune.passes.sparsity.refine import dsnot_refine, outlier_ratio, owl_sparsities


def _reference_sparsegpt(w, H, pattern, sparsity, blocksize=128, percdamp=0.01, fixed_keep=None):
    """IST-DASLab ``fasterprune`` column by column (plus our exact per-block counts)."""
    W = w.clone().float()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hd = H + percdamp * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if fixed_keep is not None:
            prune1 = ~fixed_keep[:, i1:i2]
        elif isinstance(pattern, Unstructured):
            k = prune_count(sparsity, rows * i2) - prune_count(sparsity, rows * i1)
            idx = torch.topk((W1**2 / d**2).reshape(-1), k, largest=False).indices
            prune1.view(-1)[idx] = True
        for i in range(i2 - i1):
            if fixed_keep is None and isinstance(pattern, NM) and i % pattern.m == 0:
                tmp = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m] ** 2
                idx = torch.topk(tmp, pattern.m - pattern.n, dim=1, largest=False).indices
                prune1.scatter_(1, i + idx, True)
            q = W1[:, i].clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err = (W1[:, i] - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[~keep] = 0
    return W, keep


def _layer(out_f=48, in_f=200, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) * torch.rand(in_f, generator=g) * 3 + 0.5
    return w, x


@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)])
def test_sparsegpt_matches_the_column_by_column_reference(pattern):
    w, x = _layer()
    H = x.t() @ x
    want, want_keep = _reference_sparsegpt(w, H, pattern, 0.5, blocksize=64)
    got, keep = sparsegpt_prune(w, H, pattern, 0.5, blocksize=64)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_inverse_cholesky_is_upper_factor_of_damped_inverse():
    w, x = _layer(in_f=96)
    H = x.t() @ x
    U = _inverse_cholesky(H, 0.01)
    assert torch.equal(U, torch.triu(U)) and bool((torch.diag(U) > 0).all())
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(96)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-3, atol=1e-6)


def _lin_model(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return nn.Sequential(lin)


def test_update_obs_keeps_wanda_mask_and_lowers_reconstruction_error():
    w, x = _layer()
    model, calib = _lin_model(w), list(x.split(150))
    wanda = sparsify(model, sparsity=0.5, method="wanda", calib=calib, exclude=[])
    upd = sparsify(model, sparsity=0.5, method="wanda", calib=calib, exclude=[], update="obs")
    assert torch.equal(upd.masks["0.weight"], wanda.masks["0.weight"])
    keep = wanda.masks["0.weight"]
    want, _ = _reference_sparsegpt(w, x.t() @ x, Unstructured(), 0.5, fixed_keep=keep)
    torch.testing.assert_close(upd.model[0].weight.detach(), want, rtol=1e-4, atol=1e-4)

    def err(m):
        return ((x @ (w - m[0].weight.detach()).t()).norm() / (x @ w.t()).norm()).item()

    assert err(upd.model) < 0.9 * err(wanda.model)
    assert upd.report.layers[0].rel_error == pytest.approx(err(upd.model), rel=0.3)


def test_dsnot_keeps_row_counts_and_shrinks_expected_output_shift():
    w, x = _layer(seed=3)
    model, calib = _lin_model(w), list(x.split(150))
    wanda = sparsify(model, sparsity=0.5, method="wanda", calib=calib, exclude=[])
    ds = sparsify(model, sparsity=0.5, method="wanda", calib=calib, exclude=[], refine="dsnot")
    k0, k1 = wanda.masks["0.weight"], ds.masks["0.weight"]
    assert torch.equal(k0.sum(1), k1.sum(1)) and not torch.equal(k0, k1)
    mean = x.mean(0)

    def shift(keep):  # per row: expected output change sum_{j pruned} W_ij E[x_j]
        return ((w * mean) * ~keep).sum(1).abs()

    assert bool((shift(k1) <= shift(k0) + 1e-5).all())
    assert shift(k1).mean() < 0.5 * shift(k0).mean()


def test_dsnot_zero_cycles_is_identity_and_threshold_stops_rows():
    w, x = _layer(seed=4)
    keep = torch.rand(w.shape) > 0.5
    wanda = w.abs() * x.norm(dim=0)
    args = (w, keep, wanda, x.mean(0), x.var(0, unbiased=False))
    assert torch.equal(dsnot_refine(*args, cycles=0), keep)
    assert torch.equal(dsnot_refine(*args, threshold=math.inf), keep)


def test_owl_ratios_keep_the_weighted_mean_and_order():
    per = owl_sparsities([0.010, 0.030, 0.020, 0.015], [100, 100, 300, 100], 0.5, 0.08)
    assert sum(s * n for s, n in zip(per, [100, 100, 300, 100])) / 600 == pytest.approx(0.5)
    assert per[1] < per[2] < per[3] < per[0]  # more outliers -> denser
    assert max(per) - min(per) == pytest.approx(0.16)
    assert owl_sparsities([0.02, 0.02], [5, 5], 0.5, 0.08) == [0.5, 0.5]
    s = torch.tensor([1.0, 1.0, 1.0, 10.0])  # mean 3.25: one entry above 2x the mean
    assert outlier_ratio([s[:2], s[2:]], 2.0) == pytest.approx(0.25)


class _Block(nn.Module):
    def __init__(self, d, gain):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        with torch.no_grad():  # a few large input channels: the "outlier" features OWL counts
            self.fc1.weight[:, :gain] *= 8.0

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(h)))


class _Stack(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Block(d, g) for g in (0, 4, 1))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_owl_allocation_on_blocks_keeps_overall_sparsity():
    model = _Stack()
    calib = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    res = sparsify(model, sparsity=0.5, method="wanda", calib=calib, allocation="owl")
    blk = {i: [r for r in res.report.layers if r.name.startswith(f"blocks.{i}.")]
           for i in range(3)}
    sp = {i: 1 - sum(r.kept for r in v) / sum(r.total for r in v) for i, v in blk.items()}
    assert res.report.total_sparsity == pytest.approx(0.5, abs=0.01)
    assert len({round(v, 3) for v in sp.values()}) == 3  # non-uniform
    assert any(n.startswith("OWL") for n in res.report.notes)
    uni = sparsify(model, sparsity=0.5, method="wanda", calib=calib)
    assert all(r.sparsity == pytest.approx(0.5) for r in uni.report.layers)


def _tokens_model():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 16)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc1, self.fc2 = emb, nn.Linear(16, 32), nn.Linear(32, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, input_ids, attention_mask):
            h = self.fc2(torch.relu(self.fc1(self.emb(input_ids))))
            return self.head((h * attention_mask.unsqueeze(-1)).sum(1))

    return M()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_tokens_do_not_enter_calibration(method):
    """A padded batch of two sequences calibrates exactly like the two sequences alone."""
    model = _tokens_model()
    a, b = torch.tensor([[3, 5, 7, 9, 11, 13]]), torch.tensor([[2, 4, 6]])
    padded = {"input_ids": torch.tensor([[3, 5, 7, 9, 11, 13], [2, 4, 6, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])}
    alone = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in (a, b)]
    r1 = sparsify(model, sparsity=0.5, method=method, calib=[padded])
    r2 = sparsify(model, sparsity=0.5, method=method, calib=alone)
    for k in r1.masks:
        assert torch.equal(r1.masks[k], r2.masks[k]), k
    torch.testing.assert_close(r1.model.fc1.weight, r2.model.fc1.weight)
    # The padding (token 0 repeated) would change the statistics if it were counted.
    unmasked = {**padded, "attention_mask": torch.ones_like(padded["attention_mask"])}
    r3 = sparsify(model, sparsity=0.5, method=method, calib=[unmasked])
    assert not all(torch.equal(r1.masks[k], r3.masks[k]) for k in r1.masks)


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="wanda", allocation="owl", pattern="2:4"), "allocation='owl'"),
    (dict(method="magnitude", allocation="owl"), "allocation='owl'"),
    (dict(method="wanda", allocation="layerwise"), "allocation="),
    (dict(method="sparsegpt", refine="dsnot"), "refine='dsnot'"),
    (dict(method="wanda", refine="sparse"), "refine="),
    (dict(method="sparsegpt", update="obs"), "update='obs'"),
    (dict(method="wanda", update="admm"), "update="),
])
def test_bad_refinement_options_raise(kwargs, word):
    w, x = _layer()
    with pytest.raises(ConfigError, match=word):
        sparsify(_lin_model(w), sparsity=0.5, calib=[x], exclude=[], **kwargs)


def test_update_without_calib_says_so():
    w, _ = _layer()
    with pytest.raises(ConfigError, match="update='obs' needs calibration data"):
        sparsify(_lin_model(w), sparsity=0.5, method="magnitude", update="obs", exclude=[])
