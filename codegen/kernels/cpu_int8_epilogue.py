"""The activation of the INT8 kernels' float epilogue (:mod:`.cpu_int8`, :mod:`.cpu_int8_amx`):
applied in registers to the dequantized, bias-added vector before it is stored, so the
activation costs no pass of its own over the layer's output.

``gelu`` is the erf form (``torch.nn.GELU()``'s default, ``x · (1 + erf(x / √2)) / 2``) with
erf as the rational approximation TVM's ``fast_erf`` uses (clamped to ``[-4, 4]``, 7 odd and 5
even coefficients: the float32 approximation Eigen uses), so a fused layer computes what the
unfused fp32 ``gelu`` of the same build computes (Relax's ``FastMathTransform`` rewrites its
``erf`` to ``fast_erf``), not a different curve.
"""

from __future__ import annotations

from tvm.script import tirx as T

__all__ = ["ACTIVATIONS", "activate"]

ACTIVATIONS = (None, "relu", "gelu")
_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)  # fmt: skip
_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
         -7.37332916720468e-03, -1.42647390514189e-02)  # fmt: skip


def _c(v: float, lanes: int):
    return T.Broadcast(T.float32(v), lanes)


def _fast_erf(x, lanes: int):
    x = T.max(T.min(x, _c(4.0, lanes)), _c(-4.0, lanes))
    x2 = x * x
    p = _c(_ALPHA[0], lanes)
    for a in _ALPHA[1:]:
        p = p * x2 + _c(a, lanes)
    q = _c(_BETA[0], lanes)
    for b in _BETA[1:]:
        q = q * x2 + _c(b, lanes)
    return x * p / q


def activate(f, activation: str | None, lanes: int):
    """``f`` (a float32 vector expression of ``lanes`` lanes) through ``activation``."""
    if activation == "relu":
        return T.max(f, _c(0.0, lanes))
    if activation == "gelu":
        return f * (_c(0.5, lanes) + _c(0.5, lanes) * _fast_erf(f * _c(0.7071067811865476, lanes),
                                                                 lanes))  # fmt: skip
    return f
