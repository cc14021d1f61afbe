"""Shared test set-up: one torch thread per worker (CI runs two workers on two cores) and a
derandomised hypothesis profile."""

import logging
import os
import warnings

import torch
from hypothesis import settings

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
