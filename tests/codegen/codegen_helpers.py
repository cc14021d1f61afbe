"""Shared helpers for codegen tests: compare compiled outputs with PyTorch."""

from __future__ import annotations

import numpy as np
import torch

# fp32 kernels reorder sums (tiling, vector lanes): errors grow with the reduction length.
ATOL = 1e-4
RTOL = 1e-4


def _flatten(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [a for o in out for a in _flatten(o)]


def torch_outputs(model, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        return _flatten(model(*inputs))


def assert_matches(art_out, ref: list[np.ndarray], atol=ATOL, rtol=RTOL) -> None:
    outs = list(art_out) if isinstance(art_out, tuple) else [art_out]
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
