"""keep_masks keeps exact zeros through optimizer steps; AGP / linear schedules hit their targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphprune.ir.errors import ConfigError
from graphprune.api.sparsify import sparsify, sparsify_gradually
from graphprune.frontends.torch.masks import keep_masks
from graphprune.passes.sparsity.gradual import schedule_sparsity


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_keep_masks_through_momentum_and_weight_decay(opt_cls):
    model = _mlp()
    res = sparsify(model, sparsity=0.7)
    m = res.model
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.1) if opt_cls is torch.optim.SGD else dict(
        lr=0.01, weight_decay=0.1)
    opt = opt_cls(m.parameters(), **kw)
    # Momentum built up before masking must not revive pruned weights either.
    m[0].weight.data.normal_()
    with keep_masks(m, res.masks, opt):
        for _ in range(5):
            opt.zero_grad()
            m(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            for name, mask in res.masks.items():
                assert (dict(m.named_parameters())[name][~mask] == 0).all()
    with pytest.raises(ConfigError, match="parameters the model does not have"):
        keep_masks(m, {"nope.weight": torch.ones(1, dtype=torch.bool)})


def test_schedules():
    assert schedule_sparsity(0, 10, 0.9) == pytest.approx(0.0)
    assert schedule_sparsity(10, 10, 0.9) == pytest.approx(0.9)
    # AGP: s_t = s_f + (s_i - s_f)(1 - t/n)^3
    assert schedule_sparsity(5, 10, 0.8, 0.2) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5**3)
    assert schedule_sparsity(5, 10, 0.8, 0.2, "linear") == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="schedule"):
        schedule_sparsity(1, 2, 0.5, kind="cosine")


@pytest.mark.parametrize("schedule", ["agp", "linear"])
def test_gradual_masks_only_grow_and_hit_target(schedule):
    model = _mlp()
    history = []

    def fine_tune(m, masks, step):
        history.append({k: v.clone() for k, v in masks.items()})
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        with keep_masks(m, masks, opt):
            for _ in range(3):
                opt.zero_grad()
                m(torch.randn(8, 16)).pow(2).mean().backward()
                opt.step()

    res = sparsify_gradually(model, 0.8, steps=4, fine_tune=fine_tune, schedule=schedule,
                             method="random", seed=1)
    assert res.report.total_sparsity == pytest.approx(0.8, abs=1e-3)
    for prev, nxt in zip(history, history[1:]):
        for k in prev:
            assert not (nxt[k] & ~prev[k]).any()  # nothing pruned comes back
    assert res.model is not model
    with pytest.raises(ConfigError, match="N:M"):
        sparsify_gradually(model, 0.5, steps=2, pattern="2:4")
