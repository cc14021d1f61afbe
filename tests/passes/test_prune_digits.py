"""Real data, real training: a CNN trained on scikit-learn's digits keeps its accuracy after
structured pruning to half its MACs and a short fine-tune (l2 and taylor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.models.cnn import DigitsCNN
from graphprune.models.digits import accuracy, digits_split, fit

MARGIN = 0.03  # accuracy may drop at most 3 points after pruning to 50% MACs + fine-tune


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits
    model = fit(DigitsCNN(), xtr, ytr, epochs=12)
    return model, accuracy(model, xte, yte)


@pytest.mark.parametrize("criterion", ["l2", "taylor"])
def test_half_the_macs_keeps_accuracy_after_fine_tune(digits, trained, criterion):
    xtr, ytr, xte, yte = digits
    model, dense_acc = trained
    assert dense_acc > 0.95
    calib = [(xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, 512, 64)]
    res = gp.prune(model, (xtr[:64],), target_macs=0.5, criterion=criterion, scope="global",
                   calib=calib, loss_fn=lambda out, b: F.cross_entropy(out, b[1]))  # fmt: skip
    assert res.report.macs_ratio <= 0.5
    assert res.report.form == "module"
    one_shot = accuracy(res.model, xte, yte)
    tuned = fit(res.model, xtr, ytr, epochs=3, lr=1e-3)
    acc = accuracy(tuned, xte, yte)
    print(f"\n{criterion}: dense {dense_acc:.3f}, pruned one-shot {one_shot:.3f}, "
          f"fine-tuned {acc:.3f}, MACs {res.report.macs_ratio:.2f}")
    assert acc >= dense_acc - MARGIN
    assert np.isfinite(one_shot)
