"""INT8 dense kernels (CPU): ``Y[M, N] = dequant(Xq[M, K] @ Wq[N, K].T) (+ bias) (+ relu)``.

What they compute. Weights are symmetric int8 per output channel (``Wq = clip(round(W / s_w),
-127, 127)``, the scheme of ``graphprune.ir.quant``); activations arrive as **uint8 with a zero
point of 128** (``Xu = Xq + 128``, ``Xq`` in ``[-127, 127]``), because the x86 dot-product
instructions multiply unsigned by signed bytes. The int32 product of the signed values is then
``Σ_k Xu·Wq - 128·Σ_k Wq[n, k]``: the column sums are computed once, when the weight is packed,
so the kernels' int32 result equals ``Xq @ Wq.T`` exactly (:func:`gemm_int8_kernel` with
``out="int32"``). The float epilogue dequantizes in registers: ``acc · s_x[m] · s_w[n]``, adds
the bias and applies ``relu`` or ``gelu`` (:mod:`.cpu_int8_epilogue`) when asked, and stores
float32; nothing goes back to memory as int32.

Three instruction paths, chosen by :func:`int8_isa` from the target's features:

* ``"amx"`` (AMX-INT8 tiles: Sapphire Rapids and later): ``tdpbusd`` on 16×64-byte tiles, in
  :mod:`.cpu_int8_amx` (same packing with 2-vector blocks, ``K`` padded to 64 and the rows to
  32); about 4× the VNNI kernel on the BERT-base shapes (``benchmarks/bench_int8.py``).
* ``"vnni"`` (AVX-512 VNNI: Cascade Lake and later, Zen 4/5): ``vpdpbusd`` — the instruction
  TVM 0.27 registers as the tensor intrinsic ``dot_16x4_vnni`` (``tvm.s_tir.tensor_intrin.x86``,
  ``llvm.x86.avx512.vpdpbusd.512``) — adds 4 u8×s8 products into each of 16 int32 lanes, with
  no intermediate saturation. The weight is prepacked ``[N/16, K/4, 16, 4]``: one 64-byte load
  is the 16 output channels × 4 reduction steps one instruction takes, and 4 activation bytes
  are one broadcast int32. A register tile of ``mr`` rows × ``nr`` vectors of 16 channels keeps
  ``mr·nr`` accumulators in zmm registers.
* ``"avx2"`` (no VNNI): ``vpmaddwd`` on int16 (``llvm.x86.avx2.pmadd.wd``): pairs of u8
  activations zero-extended to int16 times sign-extended int8 weights, summed pairwise into
  int32 — exact, unlike ``vpmaddubsw``, whose int16 pair sum saturates (255·127·2 > 32767) and
  would make results wrong for large activations. Weight packed ``[N/8, K/2, 8, 2]``.

Loops are written directly as loop-level TIR (like the sparse kernels of this package, the
loop nest *is* the schedule; :data:`~.cpu_common.KERNEL_ATTRS` keeps the schedule pass away):
column blocks of ``nr`` vectors are the parallel tasks, rows go in tiles of ``mr`` inside a
task (so a task's packed weight panel stays in L2 while every row tile reads it), the
reduction is innermost. ``K`` is padded to a multiple of 4 with zero weights (the padded
activation bytes are then never read as anything but ``x·0``); ``N`` to whole vectors in the
packed weight only: the last, partial vector is stored lane by lane.

:func:`quantize_rows_kernel` is the activation quantizer that runs before the GEMM: per row
(token) ``s_x = absmax / 127`` (W8A8 dynamic), or one calibrated scale (W8A8 static), then
``Xu = clip(nearbyint(x / s_x), -127, 127) + 128`` (round half to even, as ``numpy.rint``:
the same float32 operations as ``graphprune.ir.quant.fake_quantize_act``), written ``[M, Kp]``
with the padding at the zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from graphprune.codegen.kernels.cpu_common import ACC_SCOPE, KERNEL_ATTRS
from graphprune.codegen.kernels.cpu_int8_epilogue import ACTIVATIONS, activate
from graphprune.codegen.kernels.cpu_int8_amx import (
    AMX_K_ALIGN,
    AMX_M_ALIGN,
    AMX_NR,
    gemm_amx_kernel,
)
from tvm.script import tirx as T

from graphprune.ir.errors import CodegenUnsupported

__all__ = [
    "ACTIVATIONS",
    "ISAS",
    "IsaSpec",
    "dense_arrays",
    "gemm_int8_kernel",
    "int8_isa",
    "isa_spec",
    "pack_weight",
    "pad_k",
    "pad_m",
    "quantize_rows_kernel",
    "quantize_weight",
]  # fmt: skip

ISAS = ("amx", "vnni", "avx2")
ZERO_POINT = 128  # u8 activations: Xu = Xq + 128
# op_pattern kOpaque (8): Relax's pattern analysis asserts a block body otherwise, and FuseOps
# must not fuse a neighbour (the reshape before, the bias add after) into a hand-written loop nest
INT8_ATTRS = {**KERNEL_ATTRS, "op_pattern": 8}


@dataclass(frozen=True)
class IsaSpec:
    """One instruction path: ``lanes`` int32 outputs per vector, ``group`` reduction steps per
    instruction, and the default register tile ``mr`` rows × ``nr`` vectors."""

    name: str
    lanes: int
    group: int
    mr: int
    nr: int
    k_align: int = 4  # the reduction is padded to this (zero weights)
    m_align: int = 1  # the activation rows are padded to this (zero-point rows)


_SPECS = {
    # 16x16 int32 tiles: 4 accumulate 32 rows x 32 channels (see cpu_int8_amx)
    "amx": IsaSpec("amx", 16, 4, AMX_M_ALIGN, AMX_NR, AMX_K_ALIGN, AMX_M_ALIGN),
    # 24 of 32 zmm registers accumulate; 4 hold weight vectors, one the broadcast activation
    "vnni": IsaSpec("vnni", 16, 4, 6, 4),
    # 8 of 16 ymm registers accumulate; 2 weight vectors (widened), 1 broadcast, temporaries
    "avx2": IsaSpec("avx2", 8, 2, 4, 2),
}


def isa_spec(isa: str) -> IsaSpec:
    if isa not in _SPECS:
        raise CodegenUnsupported(f"int8 kernels: isa must be one of {ISAS}, not {isa!r}")
    return _SPECS[isa]


def int8_isa(target) -> str:
    """``"amx"`` where ``target`` has AMX-INT8 tiles, ``"vnni"`` where it has AVX-512 VNNI,
    ``"avx2"`` where it has AVX2, else raise :class:`CodegenUnsupported` (no int8 path for it:
    the layer stays fp32)."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        raise CodegenUnsupported(f"int8 kernels are CPU (llvm) kernels, not {target.kind.name}")
    with target:
        if codegen.target_has_features("amx-int8") and codegen.target_has_features("amx-tile"):
            return "amx"
        if codegen.target_has_features("avx512vnni"):
            return "vnni"
        if codegen.target_has_features("avx2"):
            return "avx2"
    raise CodegenUnsupported(
        f"target {target} has neither AVX-512 VNNI nor AVX2: no int8 kernel for it"
    )


def pad_k(k: int, isa: str = "vnni") -> int:
    """Reduction length ``isa``'s kernel reads: ``k`` rounded up to a multiple of 4 (64 for
    AMX tiles)."""
    align = isa_spec(isa).k_align
    return -(-k // align) * align


def pad_m(m: int, isa: str = "vnni") -> int:
    """Activation rows ``isa``'s kernel reads (the quantizer's output rows): ``m``, rounded up
    to a multiple of 32 for AMX tiles."""
    align = isa_spec(isa).m_align
    return -(-m // align) * align


def quantize_weight(w: np.ndarray, scale: np.ndarray | None = None):
    """``(Wq int8 [N, K], scale float32 [N])``: symmetric per output channel,
    ``Wq = clip(rint(W / s), -127, 127)``, ``s = absmax / 127`` unless ``scale`` is given
    (a zero row gets ``s = 1``).

    Examples
    --------
    >>> q, s = quantize_weight(np.array([[1.0, -0.5], [0.0, 0.0]], "float32"))
    >>> q.tolist(), s.tolist()
    ([[127, -64], [0, 0]], [0.007874015718698502, 1.0])
    """
    w = np.asarray(w, np.float32)
    if scale is None:
        amax = np.abs(w).max(axis=1) if w.size else np.zeros(w.shape[0], np.float32)
        scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    scale = np.asarray(scale, np.float32).reshape(-1)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pack_weight(wq: np.ndarray, isa: str, nr: int | None = None):
    """``(packed int8 [NB, Kp/G, nr, L, G], corr int32 [Nv·L])`` for ``isa`` from ``Wq[N, K]``:
    ``Nv = ceil(N / L)`` vectors of ``L`` output channels in ``NB = ceil(Nv / nr)`` blocks of
    ``nr`` (the kernel's register tile, default the isa's). Within a block the ``nr`` vectors
    of one reduction group are adjacent, so a register tile streams its weights from one
    contiguous panel (separate per-vector panels lay 4 streams a multiple of 4 KiB apart: the
    same L1 sets). ``corr[n] = 128 · Σ_k Wq[n, k]`` (the zero-point correction); padding zero.

    Examples
    --------
    >>> p, c = pack_weight(np.ones((3, 5), np.int8), "vnni")
    >>> p.shape, c.shape, c[:4].tolist()
    ((1, 2, 4, 16, 4), (16,), [640, 640, 640, 0])
    """
    spec = isa_spec(isa)
    nr = nr or spec.nr
    wq = np.asarray(wq)
    if wq.dtype != np.int8 or wq.ndim != 2:
        raise CodegenUnsupported(f"pack_weight takes an int8 [N, K] matrix, got {wq.dtype}{wq.shape}")
    n, k = wq.shape
    lanes, group = spec.lanes, spec.group
    nvec, kp = -(-n // lanes), pad_k(k, isa)
    nblk = -(-nvec // nr)
    full = np.zeros((nblk * nr * lanes, kp), np.int8)
    full[:n, :k] = wq
    packed = full.reshape(nblk, nr, lanes, kp // group, group).transpose(0, 3, 1, 2, 4)
    corr = np.zeros(nvec * lanes, np.int32)
    corr[:n] = ZERO_POINT * wq.astype(np.int32).sum(axis=1)
    return np.ascontiguousarray(packed), corr


def _dot(spec: IsaSpec, acc_vec, xw, wp, m, kk, blk, j):
    """One instruction: ``acc_vec`` plus the ``group``-step dot products of row ``m``'s
    activations at reduction group ``kk`` with vector ``j`` of weight block ``blk``."""
    lanes = spec.lanes
    width = lanes * spec.group
    if spec.name == "vnni":
        # this wheel's LLVM declares the byte operands <64 x i8>; TVM's own dot_16x4_vnni
        # passes <16 x i32> (the older signature), which this LLVM rejects as a type mismatch
        a = T.reinterpret("int8x64", T.Broadcast(xw[m, kk], 16))
        return T.call_llvm_pure_intrin(
            "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_vec, a, wp[blk, kk, T.Ramp(j * width, 1, width)]
        )
    # avx2: the two u8 activations of group kk zero-extended into one int32 (two int16)
    pair = T.Cast("int32", xw[m, kk * 2]) | (T.Cast("int32", xw[m, kk * 2 + 1]) << 16)
    a = T.reinterpret("int16x16", T.Broadcast(pair, lanes))
    w = T.Cast("int16x16", wp[blk, kk, T.Ramp(j * width, 1, width)])
    return acc_vec + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a, w)


def gemm_int8_kernel(m: int, n: int, k: int, isa: str = "vnni", out: str = "float32",
                     bias: bool = False, activation: str | None = None,
                     mr: int | None = None, nr: int | None = None):  # fmt: skip
    """PrimFunc for ``Y[M, N]`` from ``Xu[M, Kp]`` (uint8, zero point 128).

    Arguments, in order: ``xu[M, Kp] uint8``, ``wp`` and ``corr`` from :func:`pack_weight`,
    then for ``out="float32"`` ``xscale[M]`` and ``wscale[Np]`` (float32; the padding of
    ``wscale`` is never read into an output), ``bias[Np]`` if ``bias``, and last the output
    ``y[M, N]`` (int32 for ``out="int32"``: ``Xq @ Wq.T`` exactly, no epilogue)."""
    spec = isa_spec(isa)
    if out not in ("int32", "float32"):
        raise CodegenUnsupported(f"int8 kernel output must be int32 or float32, not {out!r}")
    if activation not in ACTIVATIONS:
        raise CodegenUnsupported(f"int8 kernel epilogue: activation {activation!r} not in "
                                 f"{ACTIVATIONS}; leave it as a separate op")  # fmt: skip
    if out == "int32" and (bias or activation):
        raise CodegenUnsupported("an int32 int8 kernel has no epilogue (bias or activation)")
    if min(m, n, k) < 1:
        raise CodegenUnsupported(f"int8 kernel for an empty matrix: M={m}, N={n}, K={k}")
    if isa == "amx":
        return gemm_amx_kernel(m, n, k, out, bias, activation)
    lanes, group = spec.lanes, spec.group
    mr, nr = mr or spec.mr, nr or spec.nr
    kp = pad_k(k)
    kg = kp // group
    nvec = -(-n // lanes)
    full_vecs = n // lanes  # vectors stored whole
    part = n % lanes  # lanes of the last, partial vector
    blocks = full_vecs // nr  # parallel tasks of nr whole vectors
    rem = full_vecs % nr
    extra = 1 if (rem or part) else 0
    fty = f"float32x{lanes}"
    xw_cols = kg if isa == "vnni" else kp
    xw_dtype = "int32" if isa == "vnni" else "uint8"
    is_float = out == "float32"
    ydtype = "float32" if is_float else "int32"

    def ramp(base):
        return T.Ramp(base, 1, lanes)

    def finish(accv, corr, xs, ws, b, row, col):
        """The epilogue of one accumulator vector for row ``row``, columns ``col...``."""
        v = accv - corr[ramp(col)]
        if not is_float:
            return v
        f = T.Cast(fty, v) * (T.Broadcast(xs[row], lanes) * ws[ramp(col)])
        if bias:
            f = f + b[ramp(col)]
        return activate(f, activation, lanes)

    @T.macro
    def tile(xw, wp, corr, xs, ws, b, y, acc, stage, m0, rows, blk, j0, vecs, partial):
        for i in T.unroll(rows):
            for j in T.unroll(vecs):
                acc[T.Ramp((i * vecs + j) * lanes, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
        for kk in range(kg):
            for i in T.unroll(rows):
                for j in T.unroll(vecs):
                    acc[T.Ramp((i * vecs + j) * lanes, 1, lanes)] = _dot(
                        spec, acc[T.Ramp((i * vecs + j) * lanes, 1, lanes)], xw, wp, m0 + i,
                        kk, blk, j0 + j,
                    )  # fmt: skip
        for i in T.unroll(rows):
            for j in T.unroll(vecs):
                if partial:
                    stage[T.Ramp(0, 1, lanes)] = finish(
                        acc[T.Ramp((i * vecs + j) * lanes, 1, lanes)], corr, xs, ws, b,
                        m0 + i, (blk * nr + j0 + j) * lanes,
                    )  # fmt: skip
                    for l in range(part):
                        y[m0 + i, (blk * nr + j0 + j) * lanes + l] = stage[l]
                else:
                    y[m0 + i, ramp((blk * nr + j0 + j) * lanes)] = finish(
                        acc[T.Ramp((i * vecs + j) * lanes, 1, lanes)], corr, xs, ws, b,
                        m0 + i, (blk * nr + j0 + j) * lanes,
                    )  # fmt: skip

    @T.macro
    def column_block(xw, wp, corr, xs, ws, b, y, acc, stage, blk, j0, vecs, partial):
        for mt in range(m // mr):
            tile(xw, wp, corr, xs, ws, b, y, acc, stage, mt * mr, mr, blk, j0, vecs, partial)
        if m % mr > 0:
            tile(xw, wp, corr, xs, ws, b, y, acc, stage, m // mr * mr, m % mr, blk, j0, vecs,
                 partial)  # fmt: skip

    @T.macro
    def body(xw, wp, corr, xs, ws, b, y):
        for t in T.parallel(blocks + extra):
            acc = T.decl_buffer((mr * nr * lanes,), "int32", scope=ACC_SCOPE)
            stage = T.decl_buffer((lanes,), ydtype, scope=ACC_SCOPE)
            if t < blocks:
                column_block(xw, wp, corr, xs, ws, b, y, acc, stage, t, 0, nr, False)
            else:
                if rem > 0:
                    column_block(xw, wp, corr, xs, ws, b, y, acc, stage, blocks, 0, rem, False)
                if part > 0:
                    column_block(xw, wp, corr, xs, ws, b, y, acc, stage, blocks, rem, 1, True)

    nblk = -(-nvec // nr)
    wshape = (nblk, kg, nr, lanes, group)
    npad = nvec * lanes

    if not is_float:

        @T.prim_func
        def gemm_int8_i32(
            xu: T.Buffer((m, kp), "uint8"),
            wp: T.Buffer(wshape, "int8"),
            corr: T.Buffer((npad,), "int32"),
            y: T.Buffer((m, n), "int32"),
        ):
            T.func_attr(INT8_ATTRS)
            xw = T.decl_buffer((m, xw_cols), xw_dtype, data=xu.data)
            wv = T.decl_buffer((nblk, kg, nr * lanes * group), "int8", data=wp.data)
            body(xw, wv, corr, corr, corr, corr, y)

        return gemm_int8_i32

    if bias:

        @T.prim_func
        def gemm_int8_bias(
            xu: T.Buffer((m, kp), "uint8"),
            wp: T.Buffer(wshape, "int8"),
            corr: T.Buffer((npad,), "int32"),
            xs: T.Buffer((m,), "float32"),
            ws: T.Buffer((npad,), "float32"),
            b: T.Buffer((npad,), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr(INT8_ATTRS)
            xw = T.decl_buffer((m, xw_cols), xw_dtype, data=xu.data)
            wv = T.decl_buffer((nblk, kg, nr * lanes * group), "int8", data=wp.data)
            body(xw, wv, corr, xs, ws, b, y)

        return gemm_int8_bias

    @T.prim_func
    def gemm_int8(
        xu: T.Buffer((m, kp), "uint8"),
        wp: T.Buffer(wshape, "int8"),
        corr: T.Buffer((npad,), "int32"),
        xs: T.Buffer((m,), "float32"),
        ws: T.Buffer((npad,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(INT8_ATTRS)
        xw = T.decl_buffer((m, xw_cols), xw_dtype, data=xu.data)
        wv = T.decl_buffer((nblk, kg, nr * lanes * group), "int8", data=wp.data)
        body(xw, wv, corr, xs, ws, ws, y)

    return gemm_int8


def _to_u8(v, lanes: int = 1):
    """``clip(nearbyint(v), -127, 127) + 128`` as uint8 (nearbyint: half to even)."""
    def const(c, dtype):
        return T.Broadcast(T.Cast(dtype, c), lanes) if lanes > 1 else T.Cast(dtype, c)

    sfx = f"x{lanes}" if lanes > 1 else ""
    q = T.max(T.min(T.nearbyint(v), const(127, "float32")), const(-127, "float32"))
    return T.Cast(f"uint8{sfx}", T.Cast(f"int32{sfx}", q) + const(128, "int32"))


def dense_arrays(wq: np.ndarray, wscale: np.ndarray, bias: np.ndarray | None, isa: str,
                 nr: int | None = None):  # fmt: skip
    """The weight-side arguments of :func:`gemm_int8_kernel` (``out="float32"``), in order:
    ``[packed, corr, wscale padded to Np]`` plus ``bias`` padded to ``Np`` when given."""
    packed, corr = pack_weight(wq, isa, nr)
    npad, n = corr.size, wq.shape[0]
    ws = np.ones(npad, np.float32)
    ws[:n] = np.asarray(wscale, np.float32).reshape(-1)
    arrays = [packed, corr, ws]
    if bias is not None:
        b = np.zeros(npad, np.float32)
        b[:n] = np.asarray(bias, np.float32).reshape(-1)
        arrays.append(b)
    return arrays


def quantize_rows_kernel(m: int, k: int, static_scale: float | None = None, isa: str = "vnni"):
    """PrimFunc ``(x[M, K] float32, xu[Mp, Kp] uint8, xscale[M] float32)``: per-row (token)
    absmax quantization (``static_scale=None``, W8A8 dynamic) or one fixed scale (W8A8 static),
    to uint8 with zero point 128; ``Kp = pad_k(K, isa)``, ``Mp = pad_m(M, isa)``, padding 128.
    A zero row gets scale 1."""
    kp, mp = pad_k(k, isa), pad_m(m, isa)
    chunks = max(1, min(16, m))
    rows = -(-m // chunks)
    vec = 16
    kv = k // vec * vec
    if static_scale is not None:
        static_scale = float(static_scale)
        if not static_scale > 0 or not np.isfinite(static_scale):
            raise CodegenUnsupported(f"a static activation scale must be > 0, got {static_scale}")

    @T.macro
    def row_scale(x, xs, amax, i):
        if static_scale is None:
            # explicit vectors (Ramp), not T.vectorized loops: inside the root block those
            # stayed scalar and LLVM vectorised them with gathers and scattered byte stores
            amax[T.Ramp(0, 1, vec)] = T.Broadcast(T.float32(0), vec)
            for c in range(kv // vec):
                amax[T.Ramp(0, 1, vec)] = T.max(amax[T.Ramp(0, 1, vec)],
                                                T.fabs(x[i, T.Ramp(c * vec, 1, vec)]))  # fmt: skip
            for c in range(kv, k):
                amax[0] = T.max(amax[0], T.fabs(x[i, c]))
            for l in range(1, vec):
                amax[0] = T.max(amax[0], amax[l])
            xs[i] = T.Select(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1))
        else:
            xs[i] = T.float32(static_scale)

    # A root block (s_tir): Relax's RewriteDataflowReshape asks every
    # one-input call_tir callee whether it is a reshape, and that analysis asserts a block body
    @T.prim_func(s_tir=True)
    def quantize_rows(
        x: T.Buffer((m, k), "float32"),
        xu: T.Buffer((mp, kp), "uint8"),
        xs: T.Buffer((m,), "float32"),
    ):
        T.func_attr(INT8_ATTRS)
        with T.sblock("root"):
            for t in T.parallel(chunks):
                amax = T.decl_buffer((vec,), "float32", scope=ACC_SCOPE)
                for r in range(T.min(rows, m - t * rows)):
                    i: T.let = t * rows + r
                    row_scale(x, xs, amax, i)
                    for c in range(kv // vec):
                        xu[i, T.Ramp(c * vec, 1, vec)] = _to_u8(
                            x[i, T.Ramp(c * vec, 1, vec)] / T.Broadcast(xs[i], vec), vec
                        )
                    for c in range(kv, k):
                        xu[i, c] = _to_u8(x[i, c] / xs[i])
                    for c in range(k, kp):
                        xu[i, c] = T.uint8(128)
            for r in range(mp - m):
                for c in range(kp):
                    xu[m + r, c] = T.uint8(128)

    return quantize_rows
