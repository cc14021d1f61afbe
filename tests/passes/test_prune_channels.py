"""gp.prune: criteria against their definitions, options counted from the result, bad input,
and the dead-channel oracle end to end (criteria must find the dead channels)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import export_onnx

import graphprune as gp
from graphprune import models
from graphprune.testing.oracle import choose_indices, dead_positions, dead_reference, get_tensor
from graphprune.testing.oracle_onnx import random_inputs, run_onnx
from graphprune.passes.prune.plan import plan_removal
from graphprune.passes.coupling import build_coupling


class MLP(nn.Module):
    #  x ─ fc1(6) ─ relu ─ fc2 ─ out
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp_with_known_norms() -> nn.Module:
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.arange(1, 7).float()[:, None].repeat(1, 4) * 0.1)
        m.fc1.bias.zero_()
        m.fc2.weight.fill_(0.1)
        m.fc2.bias.zero_()
    return m


X = (torch.ones(2, 4),)


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_magnitude_criteria_remove_the_smallest_channels(criterion):
    res = gp.prune(mlp_with_known_norms(), X, ratio=0.5, criterion=criterion)
    (gid,) = res.selection.removal
    # channel i has weights 0.1*(i+1): the three smallest go (for FPGM: farthest from the
    # others are the extremes, so the middle ones go — check its own definition instead).
    if criterion == "fpgm":
        s = res.selection.scores[gid]
        assert res.selection.removal[gid] == sorted(np.argsort(s)[:3].tolist())
        assert s[0] > s[2] and s[5] > s[3]  # extremes are far from the median
    else:
        assert res.selection.removal[gid] == [0, 1, 2]
    assert res.model.fc1.out_features == 3 and res.model.fc2.in_features == 3


def test_l1_and_l2_equal_their_formulas():
    m = MLP().eval()
    pg = gp.capture(m, X)
    (g,) = [g for g in build_coupling(pg).groups if g.prunable]
    from graphprune.passes.prune import criteria

    ctx = criteria.CriterionContext(pg)
    w1, b1, w2 = m.fc1.weight.detach(), m.fc1.bias.detach(), m.fc2.weight.detach()
    want_l1 = w1.abs().sum(1) + b1.abs() + w2.abs().sum(0)
    want_l2 = w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0)
    np.testing.assert_allclose(criteria.l1(ctx, g), want_l1.numpy(), rtol=1e-6)
    np.testing.assert_allclose(criteria.l2(ctx, g), want_l2.numpy(), rtol=1e-6)


def test_taylor_and_hessian_equal_their_formulas():
    torch.manual_seed(0)
    m = MLP().eval()
    calib = [(torch.randn(2, 4),), (torch.randn(2, 4),)]
    pg = gp.capture(m, X)
    (g,) = [g for g in build_coupling(pg).groups if g.prunable]
    from graphprune.passes.prune import criteria

    ctx = criteria.CriterionContext(pg, calib)
    gw = torch.zeros(6, dtype=torch.float64)
    fisher_w2 = torch.zeros(6, dtype=torch.float64)
    for (x,) in calib:
        mm = copy.deepcopy(m)
        (0.5 * mm(x).pow(2).mean()).backward()
        terms = [(mm.fc1.weight.detach(), mm.fc1.weight.grad, 1),
                 (mm.fc1.bias.detach(), mm.fc1.bias.grad, None),
                 (mm.fc2.weight.detach(), mm.fc2.weight.grad, 0)]
        for p, grad, red in terms:
            prod = (grad * p).double()
            sq = (grad.pow(2) * p.pow(2)).double()
            gw += prod.sum(red) if red is not None else prod
            fisher_w2 += sq.sum(red) if red is not None else sq
    np.testing.assert_allclose(criteria.taylor(ctx, g), (gw.abs() / 2).numpy(), rtol=1e-5)
    np.testing.assert_allclose(criteria.hessian(ctx, g), (0.5 * fisher_w2 / 2).numpy(), rtol=1e-5)


def test_apoz_and_activation_find_the_silent_channel():
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.bias.copy_(torch.tensor([5.0, 5, -100, 5, 5, 5]))  # channel 2 is always zero
    calib = [(torch.randn(8, 4),)]
    for crit in ("apoz", "activation"):
        res = gp.prune(m, X, ratio=0.2, criterion=crit, calib=calib)
        assert res.selection.removal == {build_coupling(res.graph).groups[0].id: [2]}


def test_wanda_scores_weights_times_input_norms():
    m = mlp_with_known_norms()
    calib = [(torch.randn(8, 4),)]
    pg = gp.capture(m, X)
    (g,) = [g for g in build_coupling(pg).groups if g.prunable]
    from graphprune.passes.prune import criteria

    h = torch.relu(m.fc1(calib[0][0])).detach()
    want = m.fc2.weight.detach().abs().sum(0) * h.norm(dim=0)
    got = criteria.wanda(criteria.CriterionContext(pg, calib), g)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)


def test_bn_scale_reads_gamma():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([1.0, -0.01, 2.0, 0.5]))
    res = gp.prune(m, (torch.randn(2, 3, 4, 4),), ratio=0.5, criterion="bn_scale")
    assert list(res.selection.removal.values()) == [[1, 3]]
    assert res.model[1].num_features == 2 and res.model[3].in_channels == 2


def test_random_is_seeded_and_custom_callables_work():
    m = MLP().eval()
    a = gp.prune(m, X, ratio=0.5, criterion="random", seed=3).selection.removal
    b = gp.prune(m, X, ratio=0.5, criterion="random", seed=3).selection.removal
    assert a == b
    mine = gp.prune(m, X, ratio=0.5, criterion=lambda ctx, g: -np.arange(g.size, dtype=float))
    assert list(mine.selection.removal.values()) == [[3, 4, 5]]


def test_options_do_exactly_what_they_say():
    model, x = models.get("resnet_tiny")
    pg = gp.capture(model, x)
    sizes = {g.id: g.size for g in build_coupling(pg).groups if g.prunable}
    # local ratio: floor(0.5 * size) from every group
    res = gp.prune(model, x, ratio=0.5, graph=pg)
    assert {gid: len(i) for gid, i in res.selection.removal.items()} == {
        gid: s // 2 for gid, s in sizes.items()}
    # min_keep: never below ceil(0.75 * size)
    res = gp.prune(model, x, ratio=0.9, min_keep=0.75, graph=pg)
    assert all(sizes[g] - len(i) >= math.ceil(0.75 * sizes[g]) for g, i in res.selection.removal.items())
    # round_to: kept channel counts are multiples of 8 (every group here has granularity 1)
    res = gp.prune(model, x, ratio=0.3, round_to=8, graph=pg)
    assert all((sizes[g] - len(i)) % 8 == 0 for g, i in res.selection.removal.items())
    for name, p in res.model.named_parameters():
        if name.endswith("conv.weight") or ".body.0.weight" in name:
            assert p.shape[0] % 8 == 0, name
    # ignore: no group touching stages.3 is pruned
    res = gp.prune(model, x, ratio=0.5, ignore=["stages.3*"], graph=pg)
    touched = {m.param for gid in res.selection.removal for m in build_coupling(pg).groups[gid].params}
    assert not any(n.startswith("stages.3") for n in touched)
    # ratios: an override for one layer's group
    res = gp.prune(model, x, ratio=0.5, ratios={"stages.0.0.body.0": 0.25}, graph=pg)
    g0 = next(g for g in build_coupling(pg).groups if any(m.param == "stages.0.0.body.0.weight" and m.axis == 0
                                            for m in g.params))  # fmt: skip
    assert len(res.selection.removal[g0.id]) == g0.size // 4
    # target_macs: reached, and close to the target
    res = gp.prune(model, x, target_macs=0.5, scope="global", graph=pg)
    assert 0.4 <= res.report.macs_ratio <= 0.5
    res = gp.prune(model, x, target_params=0.6, graph=pg)
    assert 0.5 <= res.report.params_ratio <= 0.6


def test_round_to_holds_when_heads_and_head_dim_are_both_pruned():
    # 4 heads x head_dim 16 at 30%: one head and 4 head dims go. Rounding head_dim to an even
    # count (its granularity is 4 heads) would keep 3 x 12 = 36 channels, not a multiple of 8.
    model, x = models.get("hf_bert_tiny")
    res = gp.prune(model, x, ratio=0.3, round_to=8)
    shapes = {n: tuple(p.shape) for n, p in res.model.named_parameters() if p.dim() == 2
              and ".encoder." in n}  # fmt: skip
    assert shapes["model.encoder.layer.0.attention.self.query.weight"][0] < 64  # heads were cut
    assert all(d % 8 == 0 for s in shapes.values() for d in s), shapes


def test_global_scope_protects_against_layer_collapse():
    model, x = models.get("resnet_tiny")
    res = gp.prune(model, x, ratio=0.6, scope="global", min_keep=0.3)
    for gid, idx in res.selection.removal.items():
        g = build_coupling(res.graph).groups[gid]
        assert g.size - len(idx) >= math.ceil(0.3 * g.size)


def test_heads_false_keeps_attention_heads():
    model, x = models.get("vit_tiny")
    res = gp.prune(model, x, ratio=0.5, heads=False)
    assert res.report.excluded and all("heads" in w for w in res.report.excluded.values())
    res = gp.prune(model, x, ratio=0.5, heads=True)
    assert res.report.form == "graph_module"  # the forward reshapes to a fixed number of heads
    assert res.model(*x).shape == model(*x).shape


@pytest.mark.parametrize("bad, match", [
    (dict(ratio=1.0), "outside"), (dict(ratio=-0.1), "outside"),
    (dict(criterion="nope"), "unknown criterion"), (dict(criterion="taylor"), "calibration"),
    (dict(ignore=["no.such.layer*"]), "matches no parameter"), (dict(scope="planet"), "scope"),
    (dict(target_macs=0.01, min_keep=0.5), "cannot be met"),
])  # fmt: skip
def test_bad_options_are_clear_errors(bad, match):
    with pytest.raises(gp.ConfigError, match=match):
        gp.prune(*models.get("resnet_tiny"), **bad)


def test_everything_frozen_is_a_clear_error():
    m = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(gp.ConfigError, match="nothing can be pruned"):
        gp.prune(m, (torch.randn(2, 4),), ratio=0.5)


def test_inplace_and_not_inplace():
    m = mlp_with_known_norms()
    res = gp.prune(m, X, ratio=0.5)
    assert m.fc1.out_features == 6 and res.model is not m
    res = gp.prune(m, X, ratio=0.5, inplace=True)
    assert res.model is m and m.fc1.out_features == 3 and m.fc1.weight.shape == (3, 4)
    vit, x = models.get("vit_tiny")
    with pytest.raises(gp.ConfigError, match="cannot be pruned in place"):
        gp.prune(vit, x, ratio=0.5, inplace=True)


def kill(model: nn.Module, pg: gp.PruneGraph, removal: dict[int, list[int]]) -> nn.Module:
    """A copy of ``model`` with the chosen indices of each group made dead."""
    dead_model = copy.deepcopy(model)
    plan = plan_removal(pg, removal)
    with torch.no_grad():
        for gid in removal:
            for m in build_coupling(pg).groups[gid].params:
                t = get_tensor(dead_model, m.param)
                if isinstance(t, nn.Parameter):  # buffers (BN statistics) stay as they are
                    t.index_fill_(m.axis, torch.from_numpy(dead_positions(plan, m.value, m.axis,
                                                                          t.shape[m.axis])), 0)
    return dead_model


ORACLE_MODELS = sorted(models.ZOO)


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_prune_finds_and_removes_dead_channels(name):
    """Kill half of every group; l1 must pick exactly those; outputs must match the dead model
    (with statistics over approximate groups masked to the surviving channels)."""
    model, x = models.get(name)
    pg = gp.capture(model, x)
    rng = np.random.default_rng(0)
    removal = {g.id: choose_indices(g.size, rng, 0.5)[: g.size // 2]
               for g in build_coupling(pg).groups if g.prunable}  # fmt: skip
    dead = kill(model, pg, removal)
    res = gp.prune(dead, x, ratio=0.5, criterion="l1", min_keep=0.0)
    assert res.selection.removal == {gid: idx for gid, idx in removal.items() if idx}
    ref = dead_reference(res.graph, res.selection.removal)
    with torch.no_grad():
        want, got = ref(*x), res.model(*x)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert res.report.params_after < res.report.params_before


ONNX_MODELS = ["resnet_tiny", "resnet_bottleneck_tiny", "vgg_tiny", "mobilenetv2_tiny",
               "shufflenet_tiny", "densenet_tiny", "digits_cnn", "hf_bert_tiny", "hf_vit_tiny"]


@pytest.mark.parametrize("name", ONNX_MODELS)
def test_prune_onnx_finds_and_removes_dead_channels(name):
    """ONNX in, ONNX out: kill half of every group in the ONNX file; l1 must pick exactly those;
    the pruned file passes onnx.checker and computes what the dead one does (onnxruntime)."""
    import onnx

    from graphprune.testing.oracle_onnx import dead_reference_onnx

    model, x = models.get(name)
    pg = gp.capture(export_onnx(model, x))
    assert all(g.exact for g in build_coupling(pg).groups if g.prunable)  # these models have no statistics
    rng = np.random.default_rng(1)
    removal = {g.id: choose_indices(g.size, rng, 0.5)[: g.size // 2]
               for g in build_coupling(pg).groups if g.prunable}  # fmt: skip
    dead = dead_reference_onnx(pg, removal)
    res = gp.prune(dead, ratio=0.5, criterion="l1", min_keep=0.0)
    assert res.selection.removal == {gid: idx for gid, idx in removal.items() if idx}
    onnx.checker.check_model(res.model)
    feeds = random_inputs(res.graph)
    want, got = run_onnx(dead, feeds), run_onnx(res.model, feeds)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)
    assert res.report.form == "onnx" and res.report.macs_after < res.report.macs_before
    # Names are preserved: every named weight of the input is still there under its name.
    names = {i.name for i in res.model.graph.initializer}
    assert {i.name for i in dead.graph.initializer if i.name.endswith(".weight")} <= names


class _TiedHead(nn.Module):
    """Embedding → Linear → head whose weight *is* the embedding's (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


def test_globs_match_the_other_names_of_tied_weights():
    torch.manual_seed(0)
    model, ids = _TiedHead().eval(), torch.randint(0, 32, (2, 5))
    pg = gp.capture(model, (ids,))
    tied = pg.weights.keys() & {"embed.weight", "head.weight"}
    assert tied  # the loop below must check something
    for name in tied:
        assert pg.param_names(name) == (name, ({"embed.weight", "head.weight"} - {name}).pop())
    # the tied tensor counts once, as in model.parameters()
    assert gp.passes.cost.count(pg).params == sum(p.numel() for p in model.parameters())
    # the model width (embedding columns = head's reduction axis = up's input) is prunable ...
    hidden = next(g for g in build_coupling(pg).groups if any(m.param == "down.weight" and m.axis == 0
                                                for m in g.params))  # fmt: skip
    assert hidden.prunable
    # ... and either name of the tied tensor excludes it, or overrides its ratio
    for name in ("embed", "head"):
        res = gp.prune(model, (ids,), ratio=0.5, ignore=[name], graph=pg)
        assert hidden.id in res.report.excluded and hidden.id not in res.selection.removal
        res = gp.prune(model, (ids,), ratio=0.5, ratios={name: 0.25}, graph=pg)
        assert len(res.selection.removal[hidden.id]) == hidden.size // 4
        assert res.report.params_after == sum(p.numel() for p in res.model.parameters())


def test_every_name_of_a_tied_weight_is_pruned_and_stays_tied():
    """torch.export lists both names of a tied weight and reads one: the pruned GraphModule must
    not keep the other name pointing at the unpruned tensor (state_dict would disagree with the
    graph, and a reload of that state_dict would bring the old width back)."""
    torch.manual_seed(0)
    model, ids = _TiedHead().eval(), torch.randint(0, 32, (2, 5))
    res = gp.prune(model, (ids,), ratio=0.5)
    named = dict(res.model.named_parameters(remove_duplicate=False))
    embed = next(t for n, t in named.items() if n.endswith("embed.weight"))
    head = next(t for n, t in named.items() if n.endswith("head.weight"))
    assert embed is head and embed.shape[1] < 16
    assert all(t.shape[1] == embed.shape[1] for n, t in res.model.state_dict().items()
               if n.endswith(("embed.weight", "head.weight")))  # fmt: skip
