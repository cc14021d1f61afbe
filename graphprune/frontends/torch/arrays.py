"""Tensors as numpy arrays and back without copies or widening, bf16 included.

numpy has no bfloat16; ``ml_dtypes.bfloat16`` over the same bytes stands in for it, so a bf16
weight is sliced in its own 2 bytes per element instead of an fp32 copy (twice the bytes, and
that for an LLM's embedding is hundreds of MiB).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

__all__ = ["as_numpy", "as_tensor"]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """``t``'s data as a numpy array sharing its memory (a CPU copy for other devices)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def as_tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` over ``arr``'s data (shared where the dtypes agree)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(arr)
    return t.to(dtype)
