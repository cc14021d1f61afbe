"""Each criterion against its definition, on small layers (oracles computed here from scratch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphprune.api.sparsify import sparsify
from graphprune.passes.sparsity.methods import sparsegpt_prune
from graphprune.passes.sparsity.patterns import NM, Unstructured, prune_count


def _lin(in_f=64, out_f=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def _calib(in_f=64, n=4, rows=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven column scales: what separates the criteria.
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    scale = torch.logspace(-1, 1, in_f)[torch.randperm(in_f, generator=g)]
    return [(torch.randn(rows, in_f, generator=g) @ mix) * scale for _ in range(n)]


def _recon_error(w_old, w_new, calib):
    x = torch.cat(calib)
    return ((x @ w_old.t() - x @ w_new.t()).norm() / (x @ w_old.t()).norm()).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_equals_weight_times_input_norm(pattern):
    model, calib = _lin(), _calib()
    res = sparsify(model, pattern=pattern, method="wanda", calib=calib, exclude=[])
    w = model[0].weight.detach()
    x = torch.cat(calib)
    score = w.abs() * x.norm(dim=0, keepdim=True)  # |W_ij| * ||X_j||_2
    mask = res.masks["0.weight"]
    if pattern == "unstructured":  # per output row (Wanda's comparison group)
        k = prune_count(0.5, w.shape[1])
        want = torch.ones_like(mask)
        want.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    else:
        g = score.reshape(w.shape[0], -1, 4)
        want = torch.ones_like(g, dtype=torch.bool)
        want.scatter_(2, torch.topk(g, 2, dim=2, largest=False).indices, False)
        want = want.reshape(w.shape)
    assert torch.equal(mask, want)
    assert torch.equal(res.model[0].weight, model[0].weight * want)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    model, calib = _lin(), _calib()
    w = model[0].weight.detach()
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        res = sparsify(model, pattern=pattern, method=method, calib=calib, exclude=[])
        errs[method] = _recon_error(w, res.model[0].weight.detach(), calib)
        assert res.report.layers[0].rel_error == pytest.approx(errs[method], rel=0.3)
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"]


def test_sparsegpt_exact_counts_and_zero_sparsity_identity():
    w = torch.randn(16, 300)
    x = torch.randn(512, 300)
    H = x.t() @ x
    new, keep = sparsegpt_prune(w, H, Unstructured(), 0.37, blocksize=64)
    assert int((~keep).sum()) == prune_count(0.37, w.numel())
    assert (new[~keep] == 0).all()
    new0, keep0 = sparsegpt_prune(w, H, Unstructured(), 0.0)
    assert keep0.all() and torch.allclose(new0, w, atol=1e-4)
    _, keep24 = sparsegpt_prune(w, H, NM(2, 4), 0.5, blocksize=30)  # rounded to a multiple of 4
    assert (keep24.reshape(16, -1, 4).sum(-1) == 2).all()


def test_obd_uses_hessian_diagonal():
    model, calib = _lin(), _calib()
    res = sparsify(model, sparsity=0.6, method="obd", calib=calib, exclude=[])
    x = torch.cat(calib)
    H = 2 * x.t() @ x / x.shape[0]  # layer-wise Hessian of ||WX||^2 / n
    w = model[0].weight.detach()
    saliency = 0.5 * w**2 * torch.diag(H)  # OBD: s_q = H_qq w_q^2 / 2, whole layer compared
    k = prune_count(0.6, w.numel())
    want = torch.ones(w.numel(), dtype=torch.bool)
    want[torch.topk(saliency.reshape(-1), k, largest=False).indices] = False
    assert torch.equal(res.masks["0.weight"], want.reshape(w.shape))


def test_magnitude_and_random_definitions():
    model = _lin()
    w = model[0].weight.detach()
    res = sparsify(model, sparsity=0.25, method="magnitude", exclude=[])
    k = prune_count(0.25, w.numel())
    assert res.masks["0.weight"].sum() == w.numel() - k
    assert w.abs()[~res.masks["0.weight"]].max() <= w.abs()[res.masks["0.weight"]].min()
    r1 = sparsify(model, method="random", seed=3, exclude=[]).masks["0.weight"]
    r2 = sparsify(model, method="random", seed=3, exclude=[]).masks["0.weight"]
    r3 = sparsify(model, method="random", seed=4, exclude=[]).masks["0.weight"]
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 5))


def _labelled(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g))
            for _ in range(n)]


def _grads(model, batches):
    gs = []
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        gs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return gs


@pytest.mark.parametrize("method", ["taylor", "snip"])
def test_gradient_methods_match_definitions(method):
    model, batches = _mlp(), _labelled()
    res = sparsify(model, sparsity=0.5, method=method, calib=batches, exclude=[])
    gs = _grads(_mlp(), batches)
    for name in ("0.weight", "2.weight", "4.weight"):
        w = dict(model.named_parameters())[name].detach()
        if method == "taylor":  # Molchanov et al.: mean over batches of (g w)^2
            score = sum((g[name] * w) ** 2 for g in gs) / len(gs)
        else:  # SNIP: |w * dL/dw| with the gradient summed over batches
            score = (sum(g[name] for g in gs) * w).abs()
        mask = res.masks[name]
        assert score[~mask].max() <= score[mask].min() + 1e-12


def test_grasp_scores_weight_times_hessian_gradient():
    model, batches = _mlp(), _labelled(n=1)
    res = sparsify(model, sparsity=0.5, method="grasp", calib=batches, exclude=[])
    ref = _mlp()
    x, y = batches[0]
    params = list(ref.parameters())
    weights = [params[i] for i in (0, 2, 4)]
    loss = nn.functional.cross_entropy(ref(x) / 200.0, y)
    g = torch.autograd.grad(loss, weights, create_graph=True)
    z = sum((gi.detach() * gi).sum() for gi in g)
    hg = torch.autograd.grad(z, weights)
    for name, w, h in zip(("0.weight", "2.weight", "4.weight"), weights, hg):
        score = (w * h).detach()  # GraSP keeps the highest theta * Hg
        mask = res.masks[name]
        assert score[~mask].max() <= score[mask].min() + 1e-12


def test_synflow_needs_no_data():
    """Only the input shape matters: different input values, no calib -> identical masks."""
    model = _mlp()
    a = sparsify(model, torch.randn(4, 12), sparsity=0.8, method="synflow", scope="global",
                 iterations=20, exclude=[])
    b = sparsify(model, torch.randn(4, 12) * 100, sparsity=0.8, method="synflow",
                 scope="global", iterations=20, exclude=[])
    assert a.report.calibration.startswith("data-free")
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
    total = sum(m.numel() for m in a.masks.values())
    assert sum(int((~m).sum()) for m in a.masks.values()) == prune_count(0.8, total)
    for m in a.masks.values():
        assert m.any()  # SynFlow avoids layer collapse


def test_synflow_single_round_is_abs_w_times_flow_gradient():
    model = _mlp()
    res = sparsify(model, torch.zeros(1, 12), sparsity=0.5, method="synflow", iterations=1,
                   exclude=[])
    ref = _mlp().double()
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
    r = ref(torch.ones(1, 12, dtype=torch.float64)).sum()
    weights = [ref[i].weight for i in (0, 2, 4)]
    g = torch.autograd.grad(r, weights)
    for name, w, gi in zip(("0.weight", "2.weight", "4.weight"), weights, g):
        score = (w * gi).abs().detach()
        mask = res.masks[name]
        assert score[~mask].max() <= score[mask].min()
