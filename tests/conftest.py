"""Shared test set-up: one torch thread per worker (CI runs two workers on two cores), a
derandomised hypothesis profile, and the digits CNN trained once per test run."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Digits(NamedTuple):
    """scikit-learn's digits, split by :func:`graphprune.models.digits.digits_split`."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (the xdist workers)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def digits() -> Digits:
    pytest.importorskip("sklearn.datasets")
    from graphprune.models.digits import digits_split

    return Digits(*digits_split())


@pytest.fixture(scope="session")
def digits_cnn_state(tmp_path_factory, digits) -> dict[str, Tensor]:
    """The state_dict of :func:`graphprune.models.digits.train_digits_cnn`, trained once per
    test run. A session fixture runs once per xdist worker, so the first worker to get here trains
    and saves it in the run's shared temporary folder (the parent of every worker's basetemp);
    the others wait on the lock and load it. Without xdist it is simply trained."""
    from graphprune.models.digits import TRAIN_EPOCHS, train_digits_cnn

    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # basetemp's parent outlives this run
        return train_digits_cnn().state_dict()
    shared = tmp_path_factory.getbasetemp().parent
    path = shared / f"digits_cnn_{TRAIN_EPOCHS}_epochs.pt"
    with _locked(shared / "digits_cnn.lock"):
        if not path.exists():
            torch.save(train_digits_cnn().state_dict(), path)
    return torch.load(path, weights_only=True)


@pytest.fixture
def digits_cnn(digits_cnn_state) -> nn.Module:
    """A fresh copy of the trained digits CNN (eval mode) per test: fine-tune it freely."""
    from graphprune.models.cnn import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(digits_cnn_state)
    return model.eval()
