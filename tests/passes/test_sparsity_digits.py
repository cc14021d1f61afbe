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
from torch import nn

from graphprune.passes.sparsify import sparsify
from graphprune.passes.sparsity_schedule import keep_masks, sparsify_gradually

sklearn = pytest.importorskip("sklearn.datasets")

try:
    from graphprune.models import DigitsCNN
except ImportError:
    try:
        from graphprune.models.cnn import DigitsCNN
    except ImportError:  # the model zoo may not ship it yet

        class DigitsCNN(nn.Module):
            def __init__(self, width=16, hidden=64, num_classes=10):
                super().__init__()
                self.features = nn.Sequential(
                    nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
                self.classifier = nn.Sequential(nn.Linear(2 * width * 16, hidden), nn.ReLU(),
                                                nn.Linear(hidden, num_classes))

            def forward(self, x):
                return self.classifier(torch.flatten(self.features(x), 1))


def _train(model, x, y, epochs, lr=3e-3, masks=None, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    keeper = keep_masks(model, masks, opt) if masks else None
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if keeper:
        keeper.remove()
    return model.eval()


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def digits():
    d = sklearn.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = _train(DigitsCNN(), x[tr], y[tr], epochs=15)
    return model, x[tr], y[tr], x[te], y[te]


def test_digits_accuracy_table(digits):
    model, xtr, ytr, xte, yte = digits
    dense = _acc(model, xte, yte)
    assert dense > 0.95
    calib = [xtr[:256], xtr[256:512]]
    rows, acc = [], {}
    for pattern, sp in [("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.9),
                        ("2:4", None)]:
        for method in ("magnitude", "wanda", "random"):
            res = sparsify(model, xtr[:2], sparsity=sp, pattern=pattern, method=method,
                           calib=calib if method == "wanda" else None)
            a0 = _acc(res.model, xte, yte)
            ft = _train(copy.deepcopy(res.model), xtr, ytr, epochs=2, lr=1e-3, masks=res.masks)
            for name, m in res.masks.items():
                assert (dict(ft.named_parameters())[name][~m] == 0).all()
            a1 = _acc(ft, xte, yte)
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
        _train(m, xtr, ytr, epochs=1, lr=1e-3, masks=masks, seed=step)

    res = sparsify_gradually(model, 0.9, steps=3, fine_tune=fine_tune, example_inputs=xtr[:2])
    assert seen == [1, 2, 3]
    assert res.report.total_sparsity == pytest.approx(0.9, abs=1e-3)
    for name, m in res.masks.items():
        assert (dict(res.model.named_parameters())[name][~m] == 0).all()
    one_shot = _acc(sparsify(model, xtr[:2], sparsity=0.9).model, xte, yte)
    agp = _acc(res.model, xte, yte)
    print(f"\n90% magnitude: one-shot {one_shot:.3f}, AGP(3 rounds)+fine-tune {agp:.3f}")
    assert agp > one_shot
    print("\n".join(res.report.notes))
