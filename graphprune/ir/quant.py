"""The quantization record on the IR: :class:`QuantSpec`, one per quantized weight.

``PruneGraph.quant`` maps a weight parameter's graph name (the key of ``pg.weights``, exactly like
``pg.masks``) to the :class:`QuantSpec` that :func:`graphprune.quantize` chose for it. Codegen reads
it to emit INT8 kernels; the ONNX writer reads it to emit QuantizeLinear/DequantizeLinear.

Weights are quantized symmetrically per output channel, ``q = clip(round(W / s), -127, 127)``
(-128 is never used, so that ``-q`` is representable and the int8 GEMM's ``q * q`` products stay
symmetric, as in onnxruntime's and TensorRT's per-channel schemes). Symmetric quantization maps 0 to
0, so a sparse weight stays exactly as sparse. SmoothQuant's scale migration is not recorded here:
the smoothing is folded into the graph's weights themselves (``W * s`` and the previous norm's
``weight / s``), so codegen sees plain weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("w8", "w8a8_dynamic", "w8a8_static")
QMAX = 127


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized.

    Attributes
    ----------
    scheme : str
        ``"w8"`` (weights only), ``"w8a8_dynamic"`` (activation scales computed at run time per
        token) or ``"w8a8_static"`` (a per-tensor activation scale from calibration).
    weight_scale : np.ndarray
        float32, one per output channel: ``q = clip(round(W / s), -127, 127)``.
    axis : int
        The weight tensor's output-channel axis (0 for torch Linear/Conv weights).
    act_scale : float or None
        ``w8a8_static``: the per-tensor symmetric int8 scale of the layer's input; else None.
    rel_error : float or None
        The relative output error the layer alone adds on the calibration data
        (``||y_q - y|| / ||y||``, what ``gp.quantize``'s report lists); None when not measured.
        ``gp.compile(int8_tolerance=)`` keeps a layer above the tolerance in fp32.

    Examples
    --------
    >>> spec = QuantSpec("w8", np.array([0.5, 1.0], np.float32), 0, None)
    >>> quantize_weight(np.array([[1.0, -0.5], [3.0, 0.0]], np.float32), spec).tolist()
    [[2, -1], [3, 0]]
    """

    scheme: str
    weight_scale: np.ndarray
    axis: int
    act_scale: float | None = None
    rel_error: float | None = None

    def __post_init__(self) -> None:
        # Invariants a constructor can check without the weight; verify() checks the rest.
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantSpec.scheme {self.scheme!r} is not one of {SCHEMES}")
        if (self.act_scale is None) != (self.scheme != "w8a8_static"):
            raise ValueError(f"QuantSpec: act_scale is required for 'w8a8_static' and only for it "
                             f"(scheme {self.scheme!r}, act_scale {self.act_scale!r})")  # fmt: skip

    def scale_along(self, ndim: int) -> np.ndarray:
        """``weight_scale`` shaped to broadcast against a weight of ``ndim`` axes."""
        shape = [1] * ndim
        shape[self.axis] = -1
        return np.asarray(self.weight_scale, np.float32).reshape(shape)


def weight_scales(w: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per-output-channel symmetric scales ``max|W| / 127`` along ``axis`` (1 for an all-zero
    channel, so that it still quantizes to zeros and the scale stays > 0).

    >>> weight_scales(np.array([[127.0, -254.0], [0.0, 0.0]]), axis=0).tolist()
    [2.0, 1.0]
    """
    w = np.asarray(w, np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=other) if other else np.abs(w)
    return np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)


def quantize_weight(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``clip(round(W / s), -127, 127)`` as int8, ``s`` broadcast along ``spec.axis``. Round half
    to even (numpy's and ONNX QuantizeLinear's rounding)."""
    w = np.asarray(w, np.float32)
    q = np.rint(w / spec.scale_along(w.ndim))
    return np.clip(q, -QMAX, QMAX).astype(np.int8)


def dequantize(q: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``q * s`` as float32, ``s`` broadcast along ``spec.axis``."""
    q = np.asarray(q)
    return (q.astype(np.float32) * spec.scale_along(q.ndim)).astype(np.float32)


def fake_quantize(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``dequantize(quantize_weight(w, spec), spec)``: the float weight an INT8 kernel computes
    with."""
    return dequantize(quantize_weight(w, spec), spec)


def fake_quantize_act(x: np.ndarray, scheme: str, act_scale: float | None = None,
                      per_token: bool = True) -> np.ndarray:  # fmt: skip
    """A layer input as the INT8 kernel sees it (numpy reference of the frontends' writers).

    ``w8``: unchanged. ``w8a8_static``: ``clip(round(x / act_scale), -127, 127) * act_scale``.
    ``w8a8_dynamic``: the same with ``s = max|x| / 127`` taken per token (each row along the last
    axis) when ``per_token``, else over the whole tensor (convolutions); an all-zero token keeps
    zeros.

    >>> fake_quantize_act(np.array([[1.0, 0.3], [0.0, 0.0]], np.float32), "w8a8_dynamic").round(3)
    array([[1.   , 0.299],
           [0.   , 0.   ]], dtype=float32)
    """
    x = np.asarray(x, np.float32)
    if scheme == "w8":
        return x
    if scheme == "w8a8_static":
        s = np.float32(act_scale)
    else:
        amax = np.abs(x).max(axis=-1, keepdims=True) if per_token else np.abs(x).max()
        s = (np.maximum(amax, np.float32(1e-30)) / np.float32(QMAX)).astype(np.float32)
    return (np.clip(np.rint(x / s), -QMAX, QMAX) * s).astype(np.float32)
