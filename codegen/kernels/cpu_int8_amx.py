"""INT8 GEMM on AMX tiles (Intel Sapphire Rapids and later): the ``"amx"`` path of
:mod:`.cpu_int8`, same arguments and results as its VNNI kernel.

``TDPBUSD`` multiplies a 16×64 u8 tile by a 64×16 s8 tile (stored as 16 rows of 16 channels ×
4 reduction steps: exactly the VNNI packing of :func:`.cpu_int8.pack_weight`) into a 16×16
int32 tile, 16 times the work of one ``vpdpbusd``. A parallel task owns 32 output channels (a
weight block of ``nr = 2`` vectors, so both B tiles of a reduction step are one 128-byte-stride
panel) and walks the rows 32 at a time: 4 accumulator tiles (tmm0-3), 2 activation tiles
(tmm4-5), 2 weight tiles (tmm6-7), all 16 rows × 64 bytes, so one tile configuration serves the
whole kernel. Hence the padding: ``K`` to a multiple of 64 (zero weights), ``M`` to a multiple
of 32 (the activation quantizer writes the zero point into the extra rows; their results are
never stored). The accumulators go through a 32×32 int32 scratch to the same epilogue as the
VNNI kernel (zero-point correction, dequantize, bias, relu), stored for real rows and channels
only.

Written with LLVM's AMX intrinsics (``llvm.x86.ldtilecfg``, ``tileloadd64``, ``tdpbusd``,
``tilestored64``, ``tilerelease``; tile numbers are immediates, so every call is spelled out).
Linux lets a process use the AMX tile state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``; the kernel makes that system call itself on every call (a few hundred
nanoseconds; the permission is per process, so the first call grants it) and fails with a TVM
error, not ``SIGILL``, where the kernel refuses. Each parallel task loads the tile
configuration itself: it is per thread.
"""

from __future__ import annotations

from graphprune.codegen.kernels.cpu_common import KERNEL_ATTRS
from graphprune.codegen.kernels.cpu_int8_epilogue import activate
from tvm.script import tirx as T

__all__ = ["AMX_K_ALIGN", "AMX_M_ALIGN", "AMX_NR", "gemm_amx_kernel"]

AMX_NR = 2  # 16-channel vectors per parallel task (two B tiles)
AMX_M_ALIGN = 32  # rows per pass: two A tiles
AMX_K_ALIGN = 64  # bytes per tile row: one reduction step of a tile
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
_ATTRS = {**KERNEL_ATTRS, "op_pattern": 8}


def _tile(name, *args):
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def gemm_amx_kernel(m: int, n: int, k: int, out: str = "float32", bias: bool = False,
                    activation: str | None = None):  # fmt: skip
    """PrimFunc ``(xu[Mp, Kp] u8, wp[NB, Kp/4, 2, 16, 4] s8, corr[Nv·16] i32,
    [xscale[M], wscale[Nv·16], [bias[Nv·16]]], y[M, N])``; ``Mp``/``Kp`` padded to 32/64."""
    mp = -(-m // AMX_M_ALIGN) * AMX_M_ALIGN
    kp = -(-k // AMX_K_ALIGN) * AMX_K_ALIGN
    nvec = -(-n // 16)
    nblk = -(-nvec // AMX_NR)
    kg = kp // 4
    full_vecs, part = n // 16, n % 16
    is_float = out == "float32"
    ydtype = "float32" if is_float else "int32"

    def finish(cv, corr, xs, ws, b, row, col):
        v = cv - corr[T.Ramp(col, 1, 16)]
        if not is_float:
            return v
        f = T.Cast("float32x16", v) * (T.Broadcast(xs[row], 16) * ws[T.Ramp(col, 1, 16)])
        if bias:
            f = f + b[T.Ramp(col, 1, 16)]
        return activate(f, activation, 16)

    @T.macro
    def body(xu, wp, corr, xs, ws, b, y):
        wv = T.decl_buffer((nblk, kg, AMX_NR * 64), "int8", data=wp.data)
        perm = T.call_extern("int64", "syscall", T.int64(_SYS_ARCH_PRCTL),
                             T.int64(_ARCH_REQ_XCOMP_PERM), T.int64(_XFEATURE_XTILEDATA))  # fmt: skip
        assert perm == T.int64(0), "int8 AMX kernel: Linux refused the AMX tile state " \
            "(arch_prctl ARCH_REQ_XCOMP_PERM); compile for target mcpu without AMX"
        for t in T.parallel(nblk):
            cfg = T.decl_buffer((64,), "uint8", scope="global")
            c = T.decl_buffer((AMX_M_ALIGN, 32), "int32", scope="global")
            stage = T.decl_buffer((16,), ydtype, scope="global")
            for i in range(64):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)  # palette 1
            for i in range(8):  # tiles 0-7: 16 rows of 64 bytes
                cfg[16 + 2 * i] = T.uint8(64)
                cfg[48 + i] = T.uint8(16)
            _tile("ldtilecfg", T.address_of(cfg[0]))
            for mt in range(mp // AMX_M_ALIGN):
                _tile("tilezero", T.int8(0))
                _tile("tilezero", T.int8(1))
                _tile("tilezero", T.int8(2))
                _tile("tilezero", T.int8(3))
                for kt in range(kp // 64):
                    _tile("tileloadd64", T.int8(4), T.address_of(xu[mt * 32, kt * 64]),
                          T.int64(kp))  # fmt: skip
                    _tile("tileloadd64", T.int8(5), T.address_of(xu[mt * 32 + 16, kt * 64]),
                          T.int64(kp))  # fmt: skip
                    _tile("tileloadd64", T.int8(6), T.address_of(wv[t, kt * 16, 0]),
                          T.int64(AMX_NR * 64))  # fmt: skip
                    _tile("tileloadd64", T.int8(7), T.address_of(wv[t, kt * 16, 64]),
                          T.int64(AMX_NR * 64))  # fmt: skip
                    _tile("tdpbusd", T.int8(0), T.int8(4), T.int8(6))
                    _tile("tdpbusd", T.int8(1), T.int8(4), T.int8(7))
                    _tile("tdpbusd", T.int8(2), T.int8(5), T.int8(6))
                    _tile("tdpbusd", T.int8(3), T.int8(5), T.int8(7))
                _tile("tilestored64", T.int8(0), T.address_of(c[0, 0]), T.int64(128))
                _tile("tilestored64", T.int8(1), T.address_of(c[0, 16]), T.int64(128))
                _tile("tilestored64", T.int8(2), T.address_of(c[16, 0]), T.int64(128))
                _tile("tilestored64", T.int8(3), T.address_of(c[16, 16]), T.int64(128))
                for r in range(T.min(AMX_M_ALIGN, m - mt * AMX_M_ALIGN)):
                    for j in range(AMX_NR):
                        if t * AMX_NR + j < full_vecs:
                            y[mt * 32 + r, T.Ramp((t * AMX_NR + j) * 16, 1, 16)] = finish(
                                c[r, T.Ramp(j * 16, 1, 16)], corr, xs, ws, b, mt * 32 + r,
                                (t * AMX_NR + j) * 16,
                            )  # fmt: skip
                        elif t * AMX_NR + j == full_vecs:
                            stage[T.Ramp(0, 1, 16)] = finish(
                                c[r, T.Ramp(j * 16, 1, 16)], corr, xs, ws, b, mt * 32 + r,
                                (t * AMX_NR + j) * 16,
                            )  # fmt: skip
                            for l in range(part):
                                y[mt * 32 + r, (t * AMX_NR + j) * 16 + l] = stage[l]
            _tile("tilerelease")

    wshape = (nblk, kg, AMX_NR, 16, 4)
    npad = nvec * 16

    if not is_float:

        @T.prim_func
        def gemm_amx_i32(
            xu: T.Buffer((mp, kp), "uint8"),
            wp: T.Buffer(wshape, "int8"),
            corr: T.Buffer((npad,), "int32"),
            y: T.Buffer((m, n), "int32"),
        ):
            T.func_attr(_ATTRS)
            body(xu, wp, corr, corr, corr, corr, y)

        return gemm_amx_i32

    if bias:

        @T.prim_func
        def gemm_amx_bias(
            xu: T.Buffer((mp, kp), "uint8"),
            wp: T.Buffer(wshape, "int8"),
            corr: T.Buffer((npad,), "int32"),
            xs: T.Buffer((m,), "float32"),
            ws: T.Buffer((npad,), "float32"),
            b: T.Buffer((npad,), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr(_ATTRS)
            body(xu, wp, corr, xs, ws, b, y)

        return gemm_amx_bias

    @T.prim_func
    def gemm_amx(
        xu: T.Buffer((mp, kp), "uint8"),
        wp: T.Buffer(wshape, "int8"),
        corr: T.Buffer((npad,), "int32"),
        xs: T.Buffer((m,), "float32"),
        ws: T.Buffer((npad,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(_ATTRS)
        body(xu, wp, corr, xs, ws, ws, y)

    return gemm_amx
