"""The IR's quantization record: QuantSpec round trips, zeros stay zeros, verify() checks specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.ir.errors import VerificationError
from graphprune.ir.quant import QuantSpec, dequantize, quantize_weight, weight_scales
from graphprune.ir.verify import verify


def test_integer_multiples_of_the_scale_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    s = np.array([0.25, 0.5, 2.0], np.float32)
    k = rng.integers(-127, 128, size=(3, 8)).astype(np.float32)
    k[:, 0] = 127  # each row reaches the top of the range, so max|W|/127 is exactly s
    w = k * s[:, None]
    spec = QuantSpec("w8", weight_scales(w), 0, None)
    np.testing.assert_array_equal(spec.weight_scale, s)
    q = quantize_weight(w, spec)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, k.astype(np.int8))
    np.testing.assert_array_equal(dequantize(q, spec), w)


def test_zeros_quantize_to_zero_so_sparse_weights_stay_sparse() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0.0
    w[3] = 0.0  # an all-zero channel gets scale 1, not 0
    spec = QuantSpec("w8a8_dynamic", weight_scales(w), 0, None)
    q = quantize_weight(w, spec)
    assert (q[w == 0] == 0).all()
    assert (q != 0).sum() <= (w != 0).sum()  # never denser than the float weight
    assert spec.weight_scale[3] == 1.0


def test_axis_one_scales_columns() -> None:
    w = np.array([[1.0, 100.0], [-2.0, 50.0]], np.float32)
    spec = QuantSpec("w8", weight_scales(w, axis=1), 1, None)
    np.testing.assert_allclose(spec.weight_scale, [2 / 127, 100 / 127])
    assert quantize_weight(w, spec)[:, 1].tolist() == [127, 64]


def test_scheme_and_act_scale_are_checked() -> None:
    with pytest.raises(ValueError, match="scheme"):
        QuantSpec("int4", np.ones(2, np.float32), 0, None)
    with pytest.raises(ValueError, match="act_scale"):
        QuantSpec("w8a8_static", np.ones(2, np.float32), 0, None)


def test_verify_checks_quant_specs() -> None:
    pg = gp.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    w = pg.weights["weight"]
    pg.quant["weight"] = QuantSpec("w8", weight_scales(w), 0, None)
    verify(pg)
    pg.quant["weight"] = QuantSpec("w8", np.ones(4, np.float32), 0, None)
    with pytest.raises(VerificationError, match=r"'weight': weight_scale has shape \(4,\)"):
        verify(pg)
    pg.quant["weight"] = QuantSpec("w8", np.array([1, 0, 1], np.float32), 0, None)
    with pytest.raises(VerificationError, match="finite and > 0"):
        verify(pg)
    pg.quant = {"nope": QuantSpec("w8", np.ones(3, np.float32), 0, None)}
    with pytest.raises(VerificationError, match="'nope' belongs to no weight"):
        verify(pg)
