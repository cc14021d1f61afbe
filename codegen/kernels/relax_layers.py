"""Which Relax calls are ``W @ X`` products the sparse kernels can take, and how their activations
become the kernels' ``XT[K, B]`` (and the result ``YT[N, B]`` comes back).

Used by :mod:`graphprune.codegen.sparse_rewrite` on the lowered (not yet built) module. Both
importers emit the same ops for these layers, so one matcher per op serves torch.export and ONNX:

* **Linear**: ``matmul(x, permute_dims(W))`` (torch, ONNX Gemm) or ``matmul(x, W2d)`` (ONNX
  MatMul, dense weight ``W2d.T``), either possibly ``broadcast_to`` a batch of copies (torch's
  bmm form). ``B`` = all leading axes of ``x``.
* **conv2d** (NCHW/OIHW, ``groups == 1``): ``W[N, C, kh, kw]`` is the matrix ``[N, C·kh·kw]``.
  A 1×1 conv with no padding needs no copy at batch 1 (``x[1, C, H, W]`` *is* ``XT[C, H·W]``;
  a stride is one strided slice); a k×k conv is im2col'd with Relax ops (pad, one strided
  slice per kernel tap, concat: ``kh·kw`` copies of the input, which ``auto`` weighs against
  the dense conv); a patch embedding (stride = kernel, no padding) is one reshape + transpose.
  ``B`` = images × output pixels; the result is ``[N, B]`` reshaped (and, for several images,
  transposed) back to NCHW.

Each match also builds its *probe*: the same layer alone as a one-op ``main``, which the
``auto`` chooser compiles dense and rewritten to time both; and, where the caller knows the
weight's sparsity mask (from the IR), carries it in the matrix's ``[N, K]`` orientation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphprune.codegen.lower import IOSpec, LoweredModel

__all__ = ["MatrixLayer", "match_linear", "match_conv2d"]


@dataclass
class MatrixLayer:
    """A matched call: its weight parameter, the dense ``[N, K]`` matrix, the kernel batch and
    how to get ``XT`` in and ``Y`` out."""

    weight: object  # relax.Var, a weight parameter of main
    dense: np.ndarray  # float32 [N, K]
    batch: int
    signature: str  # what besides the matrix shape fixes the layer ("" for a Linear)
    to_xt: Callable  # (emit) -> XT[K, B]
    from_yt: Callable  # (emit, YT[N, B]) -> the call's result
    probe: Callable  # () -> LoweredModel with only this layer, dense
    keep: np.ndarray | None = None  # bool [N, K]: the weight's mask (True = kept), if known
    # Linears only: (emit) -> X[B, K] and (emit, Y[B, N]) -> the call's result, for the
    # row-major kernels (no transposes); None where the layer has no such form (convs)
    to_rows: Callable | None = None
    from_rows: Callable | None = None
    # a symbolic batch (dynamic-shape artifacts): ``batch`` is then only the size ``auto``
    # probes at, and the kernel must take any batch (the row-major panel kernels)
    dynamic: bool = False

    def pattern(self) -> np.ndarray:
        """The sparsity pattern as the nonzeros of an ``[N, K]`` array: the mask where known,
        else the weight itself (its zeros detected as pruned)."""
        return self.dense if self.keep is None else self.keep.astype(np.float32)


def _shape(expr) -> list[int] | None:
    ty = expr.ty
    if getattr(ty, "shape", None) is None or str(ty.dtype) != "float32":
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):  # symbolic dimensions
        return None


# Rows a dynamic Linear is probed with by ``auto`` (one BERT sequence of 128 tokens)
DYNAMIC_PROBE_BATCH = 128


def _leading_dims(x, k: int):
    """``[PrimExpr]`` of the leading (batch) axes of a float32 ``x[..., k]`` with symbolic
    ones, or None."""
    ty = x.ty
    if getattr(ty, "shape", None) is None or str(ty.dtype) != "float32":
        return None
    values = getattr(ty.shape, "values", None)
    if values is None or len(values) < 2:
        return None
    try:
        last = int(values[-1])
    except (TypeError, ValueError):  # a symbolic reduction axis
        return None
    return list(values[:-1]) if last == k else None


def _one_op_model(xshape, w: np.ndarray, op, out_shape, name: str) -> LoweredModel:
    from tvm import relax

    x = relax.Var("x", relax.TensorType(tuple(xshape), "float32"))
    wv = relax.Var("w", relax.TensorType(w.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, wv], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(op(bb, x, wv))
        bb.emit_func_output(out)
    return LoweredModel(bb.get(), [w], [IOSpec("x", tuple(xshape), "float32")],
                        [IOSpec("y", tuple(out_shape), "float32")], name)  # fmt: skip


def match_linear(call, x, rhs, weight_of: dict, lookup, mask_of=None) -> MatrixLayer | None:
    """``matmul(x, permute_dims(W))`` or ``matmul(x, W2d)`` with ``W`` a known weight;
    ``mask_of`` (optional): weight var -> its mask, in the weight's own shape."""
    from tvm import relax

    bound = lookup(rhs) if isinstance(rhs, relax.Var) else None
    if (isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.broadcast_to"
            and isinstance(bound.args[0], relax.Var)):  # fmt: skip
        # torch.export writes a Linear on a reshaped 3-D input as a bmm against the weight
        # broadcast over the batch (``broadcast_to(permute_dims(W), [B, K, N])``)
        rhs = bound.args[0]
        bound = lookup(rhs)
    if (isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.permute_dims"
            and bound.args[0] in weight_of and weight_of[bound.args[0]].ndim == 2):  # fmt: skip
        wvar, dense = bound.args[0], weight_of[bound.args[0]]
        keep = (mask_of or {}).get(wvar)
    elif rhs in weight_of and weight_of[rhs].ndim == 2:
        wvar, dense = rhs, weight_of[rhs].T
        keep = (mask_of or {}).get(wvar)
        keep = None if keep is None else keep.T
    else:
        return None
    n, k = dense.shape
    if dense.dtype != np.float32:
        return None
    xshape = _shape(x)
    if xshape is None:
        lead = _leading_dims(x, k)
        return None if lead is None else _dynamic_linear(x, lead, wvar, dense, keep)
    if xshape[-1] != k:
        return None
    batch = int(np.prod(xshape[:-1])) if len(xshape) > 1 else 1

    def to_xt(emit):
        x2 = emit(relax.op.reshape(x, (batch, k)))
        return emit(relax.op.reshape(x2, (k, 1)) if batch == 1 else relax.op.permute_dims(x2))

    def from_yt(emit, yt):
        y = relax.op.reshape(yt, (1, n)) if batch == 1 else relax.op.permute_dims(yt, [1, 0])
        return y if len(xshape) == 2 else relax.op.reshape(emit(y), (*xshape[:-1], n))

    def to_rows(emit):
        return x if len(xshape) == 2 else emit(relax.op.reshape(x, (batch, k)))

    def from_rows(emit, y):
        return y if len(xshape) == 2 else relax.op.reshape(y, (*xshape[:-1], n))

    def probe():
        def op(bb, xv, wv):
            return relax.op.matmul(xv, bb.emit(relax.op.permute_dims(wv, [1, 0])))

        return _one_op_model((batch, k), np.ascontiguousarray(dense), op, (batch, n), "probe")

    return MatrixLayer(wvar, dense, batch, "", to_xt, from_yt, probe, keep, to_rows, from_rows)


def _dynamic_linear(x, lead, wvar, dense, keep) -> MatrixLayer:
    """A Linear whose input has symbolic leading axes: rows layout only (``to_xt`` refuses)."""
    from tvm import relax

    n, k = dense.shape
    rows = lead[0]
    for d in lead[1:]:
        rows = rows * d

    def to_rows(emit):
        return x if len(lead) == 1 else emit(relax.op.reshape(x, (rows, k)))

    def from_rows(emit, y):
        return y if len(lead) == 1 else relax.op.reshape(y, (*lead, n))

    def no_xt(*_):
        raise AssertionError("a dynamic Linear is only rewritten to a row-major kernel")

    batch = DYNAMIC_PROBE_BATCH

    def probe():
        def op(bb, xv, wv):
            return relax.op.matmul(xv, bb.emit(relax.op.permute_dims(wv, [1, 0])))

        return _one_op_model((batch, k), np.ascontiguousarray(dense), op, (batch, n), "probe")

    return MatrixLayer(wvar, dense, batch, "", no_xt, no_xt, probe, keep, to_rows, from_rows,
                       dynamic=True)  # fmt: skip


def match_conv2d(call, weight_of: dict, mask_of=None) -> MatrixLayer | None:
    """An NCHW/OIHW, ungrouped, float32 ``conv2d`` whose weight is a known parameter;
    ``mask_of`` (optional): weight var -> its mask, in the weight's own shape."""
    from tvm import relax

    x, wvar = call.args
    a = call.attrs
    if wvar not in weight_of or int(a.groups) != 1:
        return None
    if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW"):
        return None
    if str(a.out_layout) not in ("NCHW", ""):
        return None
    w4 = weight_of[wvar]
    xshape = _shape(x)
    if w4.dtype != np.float32 or w4.ndim != 4 or xshape is None or len(xshape) != 4:
        return None
    n, c, kh, kw = (int(v) for v in w4.shape)
    imgs, xc, h, w = xshape
    if xc != c:
        return None
    sh, sw = (int(v) for v in a.strides)
    dh, dw = (int(v) for v in a.dilation)
    pt, pl, pb, pr = (int(v) for v in a.padding)
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        return None
    k, pix = c * kh * kw, ho * wo
    batch = imgs * pix
    direct = kh == kw == 1 and pt == pl == pb == pr == 0
    # a patch embedding (ViT): taps do not overlap, so im2col is a reshape and one transpose
    patches = ((sh, sw) == (kh, kw) and (dh, dw) == (1, 1) and pt == pl == pb == pr == 0
               and not direct)  # fmt: skip

    def to_xt(emit):
        if patches:
            xs = x
            if (h, w) != (ho * kh, wo * kw):
                xs = emit(relax.op.strided_slice(x, [2, 3], [0, 0], [ho * kh, wo * kw]))
            six = emit(relax.op.reshape(xs, (imgs, c, ho, kh, wo, kw)))
            cols = emit(relax.op.permute_dims(six, [1, 3, 5, 0, 2, 4]))  # C, kh, kw, imgs, Ho, Wo
            return emit(relax.op.reshape(cols, (k, batch)))
        if direct:
            xs = x
            if (sh, sw) != (1, 1):
                xs = emit(relax.op.strided_slice(x, [2, 3], [0, 0], [h, w], [sh, sw]))
            cols = emit(relax.op.reshape(xs, (imgs, k, pix)))
        else:
            xp = x
            if pt or pl or pb or pr:
                xp = emit(relax.op.nn.pad(x, [0, 0, 0, 0, pt, pb, pl, pr]))
            taps = []
            for i in range(kh):
                for j in range(kw):
                    tap = emit(relax.op.strided_slice(
                        xp, [2, 3], [i * dh, j * dw],
                        [i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1], [sh, sw],
                    ))  # fmt: skip
                    taps.append(emit(relax.op.reshape(tap, (imgs, c, 1, pix))))
            # concat, not stack: stack breaks the pipeline's ConvertLayout (TVM 0.27 indexes
            # its layout with -1 and raises)
            cols = emit(relax.op.reshape(emit(relax.op.concat(taps, axis=2)), (imgs, k, pix)))
        if imgs == 1:
            return emit(relax.op.reshape(cols, (k, pix)))
        return emit(relax.op.reshape(emit(relax.op.permute_dims(cols, [1, 0, 2])), (k, batch)))

    def from_yt(emit, yt):
        if imgs == 1:
            return relax.op.reshape(yt, (1, n, ho, wo))
        return relax.op.permute_dims(emit(relax.op.reshape(yt, (n, imgs, ho, wo))), [1, 0, 2, 3])

    def probe():
        def op(bb, xv, wv):
            return relax.op.nn.conv2d(xv, wv, (sh, sw), (pt, pl, pb, pr), (dh, dw), 1,
                                      "NCHW", "OIHW", "NCHW", "float32")  # fmt: skip

        return _one_op_model(xshape, w4, op, (imgs, n, ho, wo), "probe")

    sig = f"conv{kh}x{kw}s{sh}x{sw}p{pt},{pl},{pb},{pr}d{dh}x{dw}|x{'x'.join(map(str, xshape))}"
    keep = (mask_of or {}).get(wvar)
    keep = None if keep is None else keep.reshape(n, k)
    return MatrixLayer(wvar, np.ascontiguousarray(w4.reshape(n, k)), batch, sig, to_xt, from_yt,
                       probe, keep)  # fmt: skip
