"""CUDA 2:4 sparse tensor-core GEMM (PTX ``mma.sp::ordered_metadata`` m16n8k16, fp16 in, fp32
accumulate) and the numpy compressor that lays out values and metadata for it.

**Status: compiled with nvcc for sm_80/sm_90 on a machine without a GPU; never run on hardware.**
The metadata layout below is our reading of the PTX ISA and must be checked numerically on a GPU
(``tests/codegen/test_sparse_cuda.py::test_sparse24_matches_numpy_on_gpu``, marked ``gpu``)
before this kernel is called correct. The kernel is written so that it is agnostic of that
layout: it loads one metadata word per lane per 16×16 tile exactly as the compressor stored it,
so a layout fix touches only :func:`compress_24_for_mma_sp`.

Computes ``Y[N, B] = W[N, K] @ X[B, K].T`` with ``W`` 2:4 sparse along ``K`` (the A operand,
row-major, M = N) and ``X`` as the B operand (``.col``: X's rows are the columns). One warp per
16×8 output tile, K-loop of 16, fragments loaded straight from global memory (a correctness-first
kernel: no shared-memory staging or software pipelining yet). Needs ``N % 16 == 0``,
``K % 16 == 0``; ``B`` is padded to a multiple of 8 by :func:`run_sparse24`.

Fragment layout used (PTX ISA, m16n8k16 .f16; ``g = lane // 4``, ``t = lane % 4``):
A (compressed 16×8): ``a0 = {A[g][2t], A[g][2t+1]}``, ``a1 = {A[g+8][2t], A[g+8][2t+1]}``;
B (16×8): ``b0 = {B[2t][g], B[2t+1][g]}``, ``b1 = {B[2t+8][g], B[2t+9][g]}``;
C/D: ``c0,c1 = D[g][2t], D[g][2t+1]``; ``c2,c3 = D[g+8][2t..2t+1]``.
Metadata (selector 0) — *the hypothesis to verify*: lanes with ``t`` in {0, 1} carry the word;
bits [15:0] describe row ``g``, bits [31:16] row ``g + 8``; each row's four groups of four take
a nibble each (group ``j`` at bits ``4j``), the nibble being ``idx0 | idx1 << 2`` with
``idx0 < idx1`` (``ordered_metadata``). Other lanes hold 0.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphprune.ir.errors import CodegenUnsupported

__all__ = ["CUDA_SOURCE", "Sparse24", "compress_24_for_mma_sp", "decompress_24", "nvcc_compile"]

CUDA_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t gp_pack2(const __half* p) {
  return *reinterpret_cast<const uint32_t*>(p);  // two consecutive halves, low = first
}

// W values [N, K/2] half (2 kept per group of 4, in column order), meta [N/16, K/16, 32] u32,
// X [B, K] half, Y [N, B] float. Grid: (N/16, B/8), block: 32 threads (one warp).
extern "C" __global__ void gp_sparse24_gemm(const __half* __restrict__ wval,
                                            const uint32_t* __restrict__ meta,
                                            const __half* __restrict__ x,
                                            float* __restrict__ y, int n, int k, int b) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16, col0 = blockIdx.y * 8;
  const int kc = k / 2, ktiles = k / 16;
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  for (int kt = 0; kt < ktiles; ++kt) {
    const int k0 = kt * 16, c0 = kt * 8;
    uint32_t a0 = gp_pack2(wval + (size_t)(row0 + g) * kc + c0 + 2 * t);
    uint32_t a1 = gp_pack2(wval + (size_t)(row0 + g + 8) * kc + c0 + 2 * t);
    const __half* xr = x + (size_t)(col0 + g) * k + k0;
    uint32_t b0 = gp_pack2(xr + 2 * t);
    uint32_t b1 = gp_pack2(xr + 2 * t + 8);
    uint32_t e = meta[((size_t)blockIdx.x * ktiles + kt) * 32 + lane];
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5}, {%6, %7}, {%0, %1, %2, %3}, %8, 0x0;\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
  }
  float* y0 = y + (size_t)(row0 + g) * b + col0 + 2 * t;
  float* y1 = y + (size_t)(row0 + g + 8) * b + col0 + 2 * t;
  y0[0] = d0; y0[1] = d1; y1[0] = d2; y1[1] = d3;
}

// Host launcher for the GPU test (host pointers in and out; returns a cudaError_t).
extern "C" int gp_sparse24_run(const void* wval, const uint32_t* meta, const void* x, float* y,
                               int n, int k, int b) {
  __half *dw, *dx; uint32_t* dm; float* dy;
  size_t sw = (size_t)n * k / 2 * 2, sm = (size_t)(n / 16) * (k / 16) * 32 * 4;
  size_t sx = (size_t)b * k * 2, sy = (size_t)n * b * 4;
  cudaMalloc(&dw, sw); cudaMalloc(&dm, sm); cudaMalloc(&dx, sx); cudaMalloc(&dy, sy);
  cudaMemcpy(dw, wval, sw, cudaMemcpyHostToDevice);
  cudaMemcpy(dm, meta, sm, cudaMemcpyHostToDevice);
  cudaMemcpy(dx, x, sx, cudaMemcpyHostToDevice);
  gp_sparse24_gemm<<<dim3(n / 16, b / 8), 32>>>(dw, dm, dx, dy, n, k, b);
  cudaError_t err = cudaDeviceSynchronize();
  if (err == cudaSuccess) err = cudaMemcpy(y, dy, sy, cudaMemcpyDeviceToHost);
  cudaFree(dw); cudaFree(dm); cudaFree(dx); cudaFree(dy);
  return (int)err;
}
"""


@dataclass(frozen=True)
class Sparse24:
    """``values[N, K/2]`` fp16 and ``meta[N/16, K/16, 32]`` uint32 (one word per lane per tile)."""

    shape: tuple[int, int]
    values: np.ndarray
    meta: np.ndarray


def _group_indices(w: np.ndarray) -> np.ndarray:
    """In-group offsets ``[N, K/4, 2]`` of the (at most) two kept entries, ascending; groups
    with fewer nonzeros are completed with the lowest free offsets."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    order = np.argsort(g == 0, axis=2, kind="stable")[:, :, :2]
    return np.sort(order, axis=2)


def compress_24_for_mma_sp(w: np.ndarray) -> Sparse24:
    """Pack a 2:4-masked ``W[N, K]`` for :data:`CUDA_SOURCE` (layout: module docstring).

    Examples
    --------
    >>> w = np.zeros((16, 16), np.float32); w[:, 1] = 1.0; w[:, 3] = 2.0
    >>> c = compress_24_for_mma_sp(w)
    >>> c.values.shape, c.meta.shape, hex(int(c.meta[0, 0, 0]) & 0xF)
    ((16, 8), (1, 1, 32), '0xd')
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if n % 16 or k % 16:
        raise CodegenUnsupported(f"mma.sp m16n8k16 needs N and K multiples of 16, got {w.shape}")
    if ((w.reshape(n, k // 4, 4) != 0).sum(axis=2) > 2).any():
        raise CodegenUnsupported(f"weight {w.shape} is not 2:4 sparse along K")
    idx = _group_indices(w)  # [N, K/4, 2]
    vals = np.take_along_axis(w.reshape(n, k // 4, 4), idx, axis=2).reshape(n, k // 2)
    nib = (idx[:, :, 0] | (idx[:, :, 1] << 2)).astype(np.uint32)  # [N, K/4]
    # per row and 16-wide k tile: four nibbles -> 16 bits
    row16 = (nib.reshape(n, k // 16, 4) << (np.arange(4, dtype=np.uint32) * 4)).sum(
        axis=2, dtype=np.uint32
    )  # [N, K/16]
    tiles = row16.reshape(n // 16, 16, k // 16).transpose(0, 2, 1)  # [N/16, K/16, 16 rows]
    word = tiles[:, :, :8] | (tiles[:, :, 8:] << np.uint32(16))  # [.., g]: rows g and g+8
    meta = np.zeros((n // 16, k // 16, 32), np.uint32)
    meta[:, :, 0::4] = word  # lanes 4g + 0
    meta[:, :, 1::4] = word  # lanes 4g + 1
    return Sparse24((n, k), vals.astype(np.float16), meta)


def decompress_24(c: Sparse24) -> np.ndarray:
    """Dense fp32 ``W`` back from :class:`Sparse24` (reads lane ``4g`` of each tile)."""
    n, k = c.shape
    word = c.meta[:, :, 0::4]  # [N/16, K/16, 8]
    rows = np.concatenate([word & np.uint32(0xFFFF), word >> np.uint32(16)], axis=2)
    row16 = rows.transpose(0, 2, 1).reshape(n, k // 16)
    nib = (row16[:, :, None] >> (np.arange(4, dtype=np.uint32) * 4)) & np.uint32(0xF)
    nib = nib.reshape(n, k // 4)
    idx = np.stack([nib & 3, nib >> 2], axis=2).astype(np.int64)
    out = np.zeros((n, k // 4, 4), np.float32)
    np.put_along_axis(out, idx, c.values.astype(np.float32).reshape(n, k // 4, 2), axis=2)
    return out.reshape(n, k)


def nvcc_compile(out: Path, arch: str = "sm_90", kind: str = "cubin") -> Path:
    """Compile :data:`CUDA_SOURCE` with nvcc to a ``cubin`` (proves it assembles) or a ``so``
    (host launcher linked against cudart, for the GPU test)."""
    out = Path(out)
    src = out.with_suffix(".cu")
    src.write_text(CUDA_SOURCE)
    cmd = ["nvcc", f"-arch={arch}", "-O3", str(src), "-o", str(out)]
    cmd[1:1] = ["-cubin"] if kind == "cubin" else ["-shared", "-Xcompiler", "-fPIC"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CodegenUnsupported(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr}")
    return out


def run_sparse24(lib_path: Path, c: Sparse24, x: np.ndarray) -> np.ndarray:
    """Run the compiled kernel (``nvcc_compile(kind="so")``) on a GPU: ``x[B, K] @ W.T``."""
    import ctypes

    n, k = c.shape
    b = x.shape[0]
    bp = -(-b // 8) * 8
    xp = np.zeros((bp, k), np.float16)
    xp[:b] = x
    y = np.zeros((n, bp), np.float32)
    lib = ctypes.CDLL(str(lib_path))
    ptr = ctypes.c_void_p
    vals, meta = np.ascontiguousarray(c.values), np.ascontiguousarray(c.meta)
    err = lib.gp_sparse24_run(
        vals.ctypes.data_as(ptr), meta.ctypes.data_as(ptr), xp.ctypes.data_as(ptr),
        y.ctypes.data_as(ptr), n, k, bp,
    )  # fmt: skip
    if err != 0:
        raise CodegenUnsupported(f"CUDA error {err} running gp_sparse24_gemm")
    return y[:, :b].T
