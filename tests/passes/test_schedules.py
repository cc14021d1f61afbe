"""Iterative pruning (linear, AGP), lottery-ticket rewinding and sensitivity analysis."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune import models
from graphprune.api.iterative import kept_indices, schedule_fractions


def test_schedules_reach_the_ratio():
    assert schedule_fractions(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
    agp = schedule_fractions(0.8, 4, "agp")
    assert agp[-1] == pytest.approx(0.8) and agp[0] == pytest.approx(0.8 * (1 - 0.75**3))
    assert all(b > a for a, b in zip(agp, agp[1:]))
    with pytest.raises(gp.ConfigError):
        schedule_fractions(0.5, 3, "cosine")


def test_iterative_pruning_calls_fine_tune_and_lands_on_the_ratio():
    model, x = models.get("resnet_tiny")
    calls = []

    def fine_tune(m, step):
        calls.append((step, sum(p.numel() for p in m.parameters())))

    res = gp.prune_iteratively(model, x, ratio=0.5, steps=3, schedule="agp", fine_tune=fine_tune,
                               min_keep=0.0)  # fmt: skip
    assert [c[0] for c in calls] == [1, 2, 3]
    assert calls[0][1] > calls[1][1] > calls[2][1]
    # Every prunable group of 8..64 channels ends at about half its original width.
    for name, axes in res.kept.items():
        if name.endswith("body.0.weight"):
            orig = dict(model.named_parameters())[name].shape[0]
            assert abs(len(axes[0]) - orig / 2) <= 2, name
    assert res.model(*x).shape == (2, 10)


def test_rewind_takes_initial_weights_at_the_kept_indices():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():  # "training" moves the weights away from init
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    res = gp.prune(m, (torch.randn(2, 4),), ratio=0.5)
    kept = kept_indices(res)
    ticket = gp.rewind(res.model, init, kept)
    idx = torch.as_tensor(kept["0.weight"][0])
    torch.testing.assert_close(ticket[0].weight, init["0.weight"][idx])
    torch.testing.assert_close(ticket[2].weight, init["2.weight"][:, idx])
    # and iteratively: indices compose across steps
    res2 = gp.prune_iteratively(m, (torch.randn(2, 4),), ratio=0.75, steps=2, min_keep=0.0)
    ticket2 = gp.rewind(res2.model, init, res2.kept)
    idx2 = torch.as_tensor(res2.kept["0.weight"][0])
    assert len(idx2) == 2
    torch.testing.assert_close(ticket2[0].bias, init["0.bias"][idx2])


def test_sensitivity_table_and_suggestions(tmp_path):
    model, x = models.get("digits_cnn")
    ref = model(*x).detach()

    def agreement(m):
        return float((m(*x).argmax(1) == ref.argmax(1)).float().mean()) - float(
            (m(*x) - ref).pow(2).mean())

    table = gp.sensitivity(model, x, agreement, ratios=[0.0, 0.5, 0.9], plot=str(tmp_path / "s.png"))
    assert table.baseline == pytest.approx(1.0)
    assert len(table.rows) == 3
    for _, _, vals in table.rows:
        assert vals[0] == pytest.approx(1.0)  # ratio 0 is the identity
        assert vals[2] <= vals[0]
    assert set(table.suggest_ratios(0.0)) == {gid for gid, _, _ in table.rows}
    assert "baseline" in table.to_text()
