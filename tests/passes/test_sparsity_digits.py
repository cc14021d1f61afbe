"""Digits CNN (trained once per test run, see conftest): accuracy after sparsification.

Runs 50/70/90% unstructured and 2:4, each with and without a short masked fine-tune, and asserts
only orderings the literature agrees on: one-shot accuracy falls as sparsity rises, a masked
fine-tune recovers accuracy at high sparsity, magnitude beats random at 90%, and AGP with
fine-tuning beats one-shot at 90%. Accuracy tables (vs sparsity, on an MNIST CNN) are printed by
``benchmarks/bench_quality.py``, not here.
"""

from __future__ import annotations

import copy

import pytest

from graphprune.models.digits import accuracy, fit
from graphprune.api.sparsify import sparsify, sparsify_gradually


def test_digits_accuracy_orderings(digits, digits_cnn):
    model, (xtr, ytr, xte, yte) = digits_cnn, digits
    dense = accuracy(model, xte, yte)
    assert dense > 0.95
    calib = [xtr[:256], xtr[256:512]]
    acc = {}
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
    for m in ("magnitude", "wanda"):
        assert acc["unstructured@0.5", m][0] >= acc["unstructured@0.9", m][0]
        assert acc["unstructured@0.9", m][1] >= acc["unstructured@0.9", m][0]
        assert acc["unstructured@0.5", m][0] >= dense - 0.05
    assert acc["unstructured@0.9", "magnitude"][0] > acc["unstructured@0.9", "random"][0]


def test_agp_schedule_with_fine_tune_beats_one_shot(digits, digits_cnn):
    model, (xtr, ytr, xte, yte) = digits_cnn, digits
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
    assert agp > one_shot
