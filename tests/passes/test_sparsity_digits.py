"""Digits CNN (trained on scikit-learn's digits in a fixture): accuracy after sparsification.

Runs 50/70/90% unstructured and 2:4, each with and without a short masked fine-tune, prints the
table, and asserts only orderings the literature agrees on: one-shot accuracy falls as sparsity
rises, a masked fine-tune recovers accuracy at high sparsity, magnitude beats random at 90%, and
AGP with fine-tuning beats one-shot at 90%.
"""

from __future__ import annotations

import copy

import pytest
import torch

from graphprune.models.cnn import DigitsCNN
from graphprune.models.digits import accuracy, digits_split, fit
from graphprune.passes.sparsity.sparsify import sparsify
from graphprune.passes.sparsity.gradual import sparsify_gradually

pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = digits_split()
    torch.manual_seed(0)
    return fit(DigitsCNN(), xtr, ytr, epochs=15), xtr, ytr, xte, yte


def test_digits_accuracy_table(digits):
    model, xtr, ytr, xte, yte = digits
    dense = accuracy(model, xte, yte)
    assert dense > 0.95
    calib = [xtr[:256], xtr[256:512]]
    rows, acc = [], {}
    for pattern, sp in [("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.9),
                        ("2:4", None)]:
        for method in ("magnitude", "wanda", "random"):
            res = sparsify(model, xtr[:2], sparsity=sp, pattern=pattern, method=method,
                           calib=calib if method == "wanda" else None)
            a0 = accuracy(res.model, xte, yte)
            ft = fit(copy.deepcopy(res.model), xtr, ytr, epochs=2, lr=1e-3, masks=res.masks)
            for name, m in res.masks.items():
                assert (dict(ft.named_parameters())[name][~m] == 0).all()
            a1 = accuracy(ft, xte, yte)
            key = f"{pattern}@{res.report.target_sparsity:.1f}"
            acc[key, method] = (a0, a1)
            rows.append(f"{key:<18} {method:<10} {a0:>8.3f} {a1:>10.3f} "
                        f"{res.report.total_sparsity:>9.3f}")
    print(f"\ndigits CNN, dense test accuracy {dense:.3f}")
    print(f"{'pattern':<18} {'method':<10} {'one-shot':>8} {'fine-tuned':>10} {'sparsity':>9}")
    print("\n".join(rows))
    for m in ("magnitude", "wanda"):
        assert acc["unstructured@0.5", m][0] >= acc["unstructured@0.9", m][0]
        assert acc["unstructured@0.9", m][1] >= acc["unstructured@0.9", m][0]
        assert acc["unstructured@0.5", m][0] >= dense - 0.05
    assert acc["unstructured@0.9", "magnitude"][0] > acc["unstructured@0.9", "random"][0]


def test_agp_schedule_with_fine_tune_beats_one_shot(digits):
    model, xtr, ytr, xte, yte = digits
    seen = []

    def fine_tune(m, masks, step):
        seen.append(step)
        fit(m, xtr, ytr, epochs=1, lr=1e-3, masks=masks, seed=step)

    res = sparsify_gradually(model, 0.9, steps=3, fine_tune=fine_tune, example_inputs=xtr[:2])
    assert seen == [1, 2, 3]
    assert res.report.total_sparsity == pytest.approx(0.9, abs=1e-3)
    for name, m in res.masks.items():
        assert (dict(res.model.named_parameters())[name][~m] == 0).all()
    one_shot = accuracy(sparsify(model, xtr[:2], sparsity=0.9).model, xte, yte)
    agp = accuracy(res.model, xte, yte)
    print(f"\n90% magnitude: one-shot {one_shot:.3f}, AGP(3 rounds)+fine-tune {agp:.3f}")
    assert agp > one_shot
    print("\n".join(res.report.notes))
