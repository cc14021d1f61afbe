"""The INT8 GEMM kernels (codegen/kernels/cpu_int8.py) against numpy.

* int32 output: equal to ``Xq @ Wq.T`` computed in int32 by numpy, **exactly**, on shapes where
  ``K`` is not a multiple of 4 (the packed reduction group) and ``N`` not a multiple of 16 (the
  vector), and on the zero-point edge (every activation -127 or 127 against weights +-127: the
  largest products, where a saturating ``vpmaddubsw`` would be wrong).
* float output: the dequantize + bias + relu epilogue against the same products in float64, and
  the whole quantize-then-GEMM path against the float product ``x @ W.T`` within the error the
  two quantizations can add (the bound is derived in :func:`_quant_error_bound`).
* the AVX2 path (``vpmaddwd``), built for ``mcpu=haswell``, runs here (this CPU executes AVX2)
  and gives the same exact int32 results.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from graphprune.codegen.kernels.cpu_int8 import (
    dense_arrays,
    gemm_int8_kernel,
    int8_isa,
    pack_weight,
    pad_k,
    pad_m,
    quantize_rows_kernel,
    quantize_weight,
)
from graphprune.codegen.target import make_target

from graphprune.ir.errors import CodegenUnsupported
from graphprune.ir.quant import fake_quantize_act

HOST = make_target("llvm")
ISA_RANK = {"amx": 0, "vnni": 1, "avx2": 2}  # a host with a lower rank also runs the higher
HASWELL = make_target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
SHAPES = [(5, 37, 13), (1, 16, 4), (13, 50, 70), (7, 3, 1), (19, 129, 258)]

needs_vnni = pytest.mark.skipif(int8_isa(HOST) not in ("amx", "vnni"),
                                reason="host CPU has no AVX-512 VNNI")  # fmt: skip
needs_amx = pytest.mark.skipif(int8_isa(HOST) != "amx", reason="host CPU has no AMX-INT8")


def _build(func, target):
    return tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=target)


def _run(lib, *arrays):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    lib["f"](*args)
    return args[-1].numpy()


def _as_u8(xq: np.ndarray, isa: str = "vnni") -> np.ndarray:
    """Signed activations as the kernels read them: uint8 with zero point 128, K (and for AMX
    the rows) padded."""
    m, k = xq.shape
    xu = np.full((pad_m(m, isa), pad_k(k, isa)), 128, np.uint8)
    xu[:m, :k] = (xq.astype(np.int32) + 128).astype(np.uint8)
    return xu


def _int8(rng, shape):
    return rng.integers(-127, 128, shape).astype(np.int8)


def _exact(isa, target, m, n, k, rng):
    xq, wq = _int8(rng, (m, k)), _int8(rng, (n, k))
    wp, corr = pack_weight(wq, isa)
    got = _run(_build(gemm_int8_kernel(m, n, k, isa, out="int32"), target), _as_u8(xq, isa), wp,
               corr, np.zeros((m, n), np.int32))  # fmt: skip
    want = xq.astype(np.int32) @ wq.astype(np.int32).T
    np.testing.assert_array_equal(got, want)


@needs_vnni
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_vnni_int32_equals_numpy_exactly(m, n, k):
    _exact("vnni", HOST, m, n, k, np.random.default_rng(m * 1000 + n + k))


@needs_amx
@pytest.mark.parametrize("m,n,k", SHAPES + [(64, 96, 128), (33, 17, 65)])
def test_amx_int32_equals_numpy_exactly(m, n, k):
    """Rows not a multiple of 32 (two tiles), K not of 64 (one tile row), N not of 32."""
    _exact("amx", HOST, m, n, k, np.random.default_rng(m * 7 + n + k))


@pytest.mark.parametrize("m,n,k", SHAPES[:3])
def test_avx2_int32_built_for_haswell_equals_numpy_exactly(m, n, k):
    assert int8_isa(HASWELL) == "avx2"
    _exact("avx2", HASWELL, m, n, k, np.random.default_rng(m + n + k))


@pytest.mark.parametrize("isa", ["amx", "vnni", "avx2"])
def test_extreme_products_do_not_saturate(isa):
    """All products at +-127*127 (activations at +-127 are u8 255 and 1): a pairwise int16 sum
    (vpmaddubsw) would saturate at 32767; the exact sums are +-K*16129."""
    if isa != "avx2" and ISA_RANK[isa] < ISA_RANK[int8_isa(HOST)]:
        pytest.skip(f"host CPU has no {isa}")
    m, n, k = 4, 17, 64
    xq = np.full((m, k), 127, np.int8)
    xq[1] = -127
    wq = np.full((n, k), 127, np.int8)
    wq[::2] = -127
    wp, corr = pack_weight(wq, isa)
    got = _run(_build(gemm_int8_kernel(m, n, k, isa, out="int32"), HOST if isa != "avx2"
               else HASWELL), _as_u8(xq, isa), wp, corr, np.zeros((m, n), np.int32))  # fmt: skip
    np.testing.assert_array_equal(got, xq.astype(np.int32) @ wq.astype(np.int32).T)


@pytest.mark.parametrize("relu", [False, True])
def test_float_epilogue_is_the_dequantized_product(relu):
    """y = (Xq @ Wq.T) * s_x[m] * s_w[n] + b[n] (then relu), computed by the kernel in float32
    from the exact int32 sum: the only error is float32 rounding of 3 operations, so rtol 1e-6
    of the magnitude (|acc| * s_x * s_w + |b|) bounds it."""
    isa = int8_isa(HOST)
    rng = np.random.default_rng(7)
    m, n, k = 9, 45, 37
    xq, wq = _int8(rng, (m, k)), _int8(rng, (n, k))
    xs = rng.uniform(0.001, 0.1, m).astype(np.float32)
    ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    act = "relu" if relu else None
    lib = _build(gemm_int8_kernel(m, n, k, isa, bias=True, activation=act), HOST)
    got = _run(lib, _as_u8(xq, isa), *dense_arrays(wq, ws, b, isa)[:2], xs,
               *dense_arrays(wq, ws, b, isa)[2:], np.zeros((m, n), np.float32))  # fmt: skip
    acc = (xq.astype(np.int64) @ wq.astype(np.int64).T).astype(np.float64)
    want = acc * xs[:, None].astype(np.float64) * ws[None, :] + b
    if relu:
        want = np.maximum(want, 0)
    scale = np.abs(acc) * xs[:, None] * ws[None, :] + np.abs(b)
    assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30)


def _quant_error_bound(x, w, xs, ws):
    """|x @ W.T - dequant(Xq @ Wq.T)| per output. With x = xs*xq + ex, W = ws*wq + ew and
    |ex| <= xs/2, |ew| <= ws/2 (round to nearest, nothing clipped: symmetric absmax scales),
    x.w - (xs xq).(ws wq) = x.ew + ex.(ws wq) = x.ew + ex.W - ex.ew, so the error is at most
    ws/2 * sum|x| + xs/2 * sum|W| + K * xs*ws/4. Then float32 rounding of the result."""
    k = x.shape[1]
    bound = (ws[None, :] / 2 * np.abs(x).sum(1)[:, None] + xs[:, None] / 2 * np.abs(w).sum(1)
             + k * xs[:, None] * ws[None, :] / 4)  # fmt: skip
    return bound + 1e-5 * np.abs(x) @ np.abs(w).T


def test_dynamic_quantize_then_gemm_within_the_quantization_bound():
    isa = int8_isa(HOST)
    rng = np.random.default_rng(3)
    m, n, k = 11, 40, 77
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[2] = 0.0  # an all-zero token
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq, ws = quantize_weight(w)
    xu, xs = _quantize(m, k, x, isa=isa)
    got = _run(_build(gemm_int8_kernel(m, n, k, isa), HOST), xu, *dense_arrays(wq, ws, None, isa)[:2],
               xs, dense_arrays(wq, ws, None, isa)[2], np.zeros((m, n), np.float32))  # fmt: skip
    err = np.abs(got - x @ w.T)
    bound = _quant_error_bound(x, w, xs, ws)
    assert np.all(err <= bound), float((err / bound).max())
    assert np.all(got[2] == 0)
    # and it is a real approximation: far from zero error only where the bound allows
    assert err.max() > 0


def _quantize(m, k, x, static=None, isa="vnni"):
    lib = _build(quantize_rows_kernel(m, k, static, isa), HOST)
    xu, xs = np.zeros((pad_m(m, isa), pad_k(k, isa)), np.uint8), np.zeros(m, np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, xu, xs)]
    lib["f"](*args)
    return args[1].numpy(), args[2].numpy()


@pytest.mark.parametrize("static", [None, 0.02])
def test_activation_quantizer_matches_the_ir_reference(static):
    """The quantizer's int8 values times its scales are exactly ir.quant.fake_quantize_act (same
    float32 operations: absmax / 127, x / s, round half to even); the padding is the zero
    point and static scales clip."""
    rng = np.random.default_rng(5)
    m, k = 6, 45
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 5, (m, 1))).astype(np.float32)
    x[1] = 0.0
    xu, xs = _quantize(m, k, x, static)
    assert np.all(xu[:, k:] == 128)
    xq = xu[:, :k].astype(np.int32) - 128
    assert np.abs(xq).max() <= 127
    scheme = "w8a8_dynamic" if static is None else "w8a8_static"
    want = fake_quantize_act(x, scheme, static)
    np.testing.assert_array_equal((xq * xs[:, None]).astype(np.float32), want)
    if static is not None:
        assert np.all(xs == np.float32(static)) and np.abs(xq).max() == 127  # clipped


def test_amx_quantizer_pads_rows_and_k_with_the_zero_point():
    m, k = 5, 70
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    xu, _ = _quantize(m, k, x, isa="amx")
    assert xu.shape == (32, 128)
    assert np.all(xu[m:] == 128) and np.all(xu[:, k:] == 128)
    np.testing.assert_array_equal(xu[:m, :k], _quantize(m, k, x)[0][:, :k])


def test_unsupported_requests_raise_codegen_errors():
    with pytest.raises(CodegenUnsupported, match="activation"):
        gemm_int8_kernel(4, 4, 4, "vnni", activation="silu")  # gelu and relu are supported
    with pytest.raises(CodegenUnsupported, match="isa"):
        gemm_int8_kernel(4, 4, 4, "sse4")
    with pytest.raises(CodegenUnsupported, match="int8"):
        pack_weight(np.zeros((2, 2), np.float32), "vnni")
    with pytest.raises(CodegenUnsupported, match="llvm"):
        int8_isa(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm"))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_avx2_build_uses_vpmaddwd_and_never_zmm(tmp_path):
    """The AVX2 path is what an AVX2-only CPU can run: ``vpmaddwd`` on ymm registers, no
    512-bit register and no VNNI instruction anywhere in the library."""
    lib = _build(gemm_int8_kernel(13, 50, 70, "avx2", bias=True, activation="relu"), HASWELL)
    so = tmp_path / "avx2.so"
    lib.export_library(str(so))
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert re.search(r"vpmaddwd\s.*ymm", asm), "no 256-bit vpmaddwd in the AVX2 build"
    bad = [ln.strip() for ln in asm.splitlines() if re.search(r"\bzmm\d+|vpdpbusd", ln)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("isa", ["amx", "vnni"])
def test_gelu_epilogue_is_the_erf_gelu_of_the_dequantized_product(isa):
    """activation="gelu": x (1 + erf(x / sqrt 2)) / 2 of the dequantized, bias-added product,
    erf as the float32 rational approximation of fast_erf (what the fp32 build runs for gelu):
    within 1e-6 absolute of the exact erf at these magnitudes (|x| < 10)."""
    if ISA_RANK[isa] < ISA_RANK[int8_isa(HOST)]:
        pytest.skip(f"host CPU has no {isa}")
    from math import erf

    rng = np.random.default_rng(9)
    m, n, k = 9, 45, 37
    xq, wq = _int8(rng, (m, k)), _int8(rng, (n, k))
    xs = rng.uniform(0.001, 0.01, m).astype(np.float32)
    ws = rng.uniform(0.001, 0.01, n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    lib = _build(gemm_int8_kernel(m, n, k, isa, bias=True, activation="gelu"), HOST)
    arrays = dense_arrays(wq, ws, b, isa)
    got = _run(lib, _as_u8(xq, isa), *arrays[:2], xs, *arrays[2:], np.zeros((m, n), np.float32))
    h = (xq.astype(np.int64) @ wq.astype(np.int64).T) * xs[:, None].astype(np.float64) * ws + b
    assert np.abs(h).max() < 10 and h.min() < -1 and h.max() > 1  # both tails exercised
    want = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    np.testing.assert_allclose(got, want, atol=1e-6 + 1e-6 * np.abs(want).max(), rtol=1e-5)
