"""Real data for the small classifiers: scikit-learn's 8x8 digits, split once, and the short
training loop that tests, examples and benchmarks use to train and fine-tune them.

scikit-learn ships the digits (1797 images) inside its wheel, so nothing is downloaded. It is a
test/bench dependency, imported only when :func:`digits_split` runs.

Examples
--------
>>> import torch
>>> from graphprune.models.cnn import DigitsCNN
>>> from graphprune.models.digits import accuracy, digits_split, fit
>>> xtr, ytr, xte, yte = digits_split()
>>> xtr.shape, xte.shape
(torch.Size([1400, 1, 8, 8]), torch.Size([397, 1, 8, 8]))
>>> _ = torch.manual_seed(0)
>>> model = fit(DigitsCNN(), xtr[:512], ytr[:512], epochs=2)
>>> accuracy(model, xte, yte) > 0.3  # two epochs on 512 images: 0.56, chance is 0.1
True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TRAIN_EPOCHS", "accuracy", "digits_split", "fit", "train_digits_cnn"]

# The one training recipe of the digits CNN the tests share (about 1 s on one core): 15 epochs
# reach 98.5% test accuracy on the default split with seed 0.
TRAIN_EPOCHS = 15


def digits_split(n_train: int = 1400, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` scaled to [0, 1], int64
    labels, a seeded permutation split into ``n_train`` training and the rest test images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 3e-3,
        batch_size: int = 64, seed: int = 0, masks: dict[str, Any] | None = None) -> nn.Module:
    """Train ``model`` in place with Adam on cross-entropy; return it in eval mode.

    ``masks`` ({parameter name: bool mask}, as ``graphprune.sparsify`` returns them) are kept
    applied after every optimizer step, so a sparse model stays sparse while it is fine-tuned.
    """
    from graphprune.frontends.torch.masks import keep_masks

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    keeper = keep_masks(model, masks, opt) if masks else None
    model.train()
    try:
        for _ in range(epochs):
            for i in torch.randperm(len(x)).split(batch_size):
                opt.zero_grad()
                F.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
    finally:
        if keeper is not None:
            keeper.remove()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_digits_cnn(epochs: int = TRAIN_EPOCHS, seed: int = 0) -> nn.Module:
    """A ``DigitsCNN`` initialised with ``seed`` and trained on :func:`digits_split`'s training
    images for ``epochs`` (the recipe the tests train once and share)."""
    from graphprune.models.plain import DigitsCNN

    xtr, ytr, _, _ = digits_split()
    torch.manual_seed(seed)
    return fit(DigitsCNN(), xtr, ytr, epochs=epochs, seed=seed)
