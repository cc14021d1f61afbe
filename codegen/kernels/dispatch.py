"""From a dense masked weight to a ready-to-call sparse kernel: compress, pick the kernel, build.

The one entry point the Relax rewrite (:mod:`graphprune.codegen.sparse_rewrite`), the ``auto``
chooser, the tests and ``benchmarks/bench_kernels.py`` share. Kernels depend only on sizes
(the nonzero count is a symbolic extent), so builds are cached per ``(kernel key, target)``:
one build serves every density of a shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphprune.codegen.kernels import formats
from graphprune.codegen.kernels.cpu_bsr import bsr_kernel
from graphprune.codegen.kernels.cpu_common import PARALLEL_CHUNKS, balanced_row_split
from graphprune.codegen.kernels.cpu_csr import csr_kernel, pad_rows, word_indices
from graphprune.codegen.kernels.cpu_nm import nm_kernel
from graphprune.codegen.kernels.cpu_panel import (
    chunk_pointers,
    csr_chunked_kernel,
    csr_panel_kernel,
    nm_panel_kernel,
    panel_acc,
    panel_chunk,
    panel_fits,
)
from graphprune.ir.errors import CodegenUnsupported, ConfigError

__all__ = ["FORMATS", "SparseKernel", "make_kernel", "build_kernel", "run_kernel", "time_kernel"]

FORMATS = ("csr", "bsr", "nm")


@dataclass
class SparseKernel:
    """A PrimFunc for ``YT[N,B] = W @ XT[K,B]`` and the compressed arrays it takes after ``XT``."""

    fmt: str
    shape: tuple[int, int]
    batch: int
    func: object  # tvm.tirx.PrimFunc
    weights: list[np.ndarray]
    key: tuple
    detail: dict = field(default_factory=dict)
    # "xt": the kernel takes XT[K, B] and returns YT[N, B] (the caller transposes); "rows": it
    # takes X[B, K] and returns Y[B, N] (:mod:`.cpu_panel`, which packs the panel itself)
    layout: str = "xt"

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.weights)


def _pad_empty(arrays: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Zero-nonzero matrices still need one element per nnz buffer (TIR has no empty buffers);
    ``indptr`` stays all zeros, so the padding is never read."""
    if count > 0:
        return arrays
    *nz, indptr = arrays
    return [np.zeros((1, *a.shape[1:]), a.dtype) for a in nz] + [indptr]


def _panel_parts(batch) -> int:
    """Row parts per batch tile of a panel kernel: at least two parallel tasks (the project's
    machines have 2 cores; a second part repeats the tile's packing, so only when needed). A
    symbolic batch is taken as large: one part."""
    if batch is None:
        return 1
    return 2 if -(-batch // (16 * panel_acc(batch))) < 2 else 1


def make_kernel(w: np.ndarray, fmt: str, batch: int, block=(4, 4), nm=(2, 4),
                lanes: int = 16, rows: bool = False) -> SparseKernel:  # fmt: skip
    """Compress ``w`` (``[N, K]``, masked: pruned entries exactly zero) for ``fmt`` and make the
    kernel for ``batch`` rows of activations.

    ``rows=True``: the caller can hand the activations as ``X[B, K]`` and take ``Y[B, N]``;
    CSR and N:M then use the row-major panel kernels (:mod:`.cpu_panel`) where the sizes allow
    (``kernel.layout == "rows"``), which need no transposes around them. ``batch=None`` (with
    ``rows=True``): a kernel for any batch (a symbolic extent), which only the panel kernels
    are; ``CodegenUnsupported`` where they do not take the layer.

    Raises ``CodegenUnsupported`` when ``w`` does not fit ``fmt`` (e.g. a group with more than
    ``N`` nonzeros for ``nm``).

    Examples
    --------
    >>> kern = make_kernel(np.eye(4, dtype="float32"), "csr", batch=2)
    >>> kern.fmt, kern.shape, [a.dtype.name for a in kern.weights]
    ('csr', (4, 4), ['float32', 'int16', 'int32', 'int32'])
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    panel = rows and fmt in ("csr", "nm") and panel_fits(n, k, batch, lanes)
    if batch is None and not panel:
        raise CodegenUnsupported(
            f"no {fmt} kernel for a symbolic batch of a {n}x{k} weight: only CSR and N:M with "
            f"both sizes multiples of 16 on an AVX-512 target (lanes {lanes}) take one"
        )
    if batch is not None and batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if panel and fmt == "csr":
        c = formats.compress_csr(w)
        idx = str(c.indices.dtype)
        arrays = _pad_empty(c.arrays(), c.nnz)
        parts = _panel_parts(batch)
        split = balanced_row_split(arrays[-1][::16], parts)
        chunk = panel_chunk(batch)
        chunks = -(-k // chunk)
        # K-chunks keep the panel in L1 but load and store each row's partial sums once per
        # chunk: worth it from about 32 nonzeros per row and chunk (4096-wide rows at 90%
        # zeros: 12.8, no gain; at 50%: 64, 34 -> 44 GFMA/s, one thread, batch 128)
        if chunks > 1 and c.nnz >= 32 * n * chunks:
            arrays[2] = chunk_pointers(c.indices, c.indptr, k, chunk)
            func = csr_chunked_kernel(n, k, batch, idx, parts)
            key = ("csr_chunked", n, k, batch or "dyn", idx, parts)
        else:
            func = csr_panel_kernel(n, k, batch, idx, parts)
            key = ("csr_panel", n, k, batch or "dyn", idx, parts)
        detail = {"nnz": c.nnz, "index_dtype": idx, "layout": "rows", "k_chunks": chunks}
        return SparseKernel(fmt, (n, k), batch, func, arrays + [split], key, detail, "rows")
    if panel and fmt == "nm":
        c = formats.compress_nm(w, *nm)
        kept = c.values.shape[1]
        parts = _panel_parts(batch)
        split = (np.arange(parts + 1) * (n // 16) // parts).astype(np.int32)
        func = nm_panel_kernel(n, k, batch, (c.n, c.m), kept, parts)
        key = ("nm_panel", n, k, batch or "dyn", (c.n, c.m), kept, parts)
        # the panel frame takes three weight arrays; N:M has two, the third is never read
        arrays = [*c.arrays(), np.zeros(1, np.int32), split]
        return SparseKernel(fmt, (n, k), batch, func, arrays, key,
                            {"nm": [c.n, c.m], "layout": "rows"}, "rows")  # fmt: skip
    if fmt == "csr":
        c = formats.compress_csr(w)
        idx = str(c.indices.dtype)
        arrays = _pad_empty(c.arrays(), c.nnz)
        if batch == 1:  # the default "word" gather reads whole uint64 words of indices
            arrays = list(pad_rows(*arrays, word_indices(idx)))
        split = balanced_row_split(arrays[-1], PARALLEL_CHUNKS)
        func = csr_kernel(n, k, batch, idx, lanes, chunks=PARALLEL_CHUNKS)
        arrays = arrays + [split]
        key = ("csr", n, k, batch, idx, lanes, PARALLEL_CHUNKS)
        return SparseKernel(fmt, (n, k), batch, func, arrays, key,
                            {"nnz": c.nnz, "index_dtype": idx})  # fmt: skip
    if fmt == "bsr":
        b = formats.compress_bsr(w, tuple(block))
        idx = str(b.indices.dtype)
        func = bsr_kernel(n, k, batch, b.block, idx, lanes)
        arrays = _pad_empty(b.arrays(), b.nnzb)
        key = ("bsr", n, k, batch, b.block, idx, lanes)
        return SparseKernel(fmt, (n, k), batch, func, arrays, key,
                            {"nnz_blocks": b.nnzb, "block": list(b.block), "index_dtype": idx})  # fmt: skip
    if fmt == "nm":
        c = formats.compress_nm(w, *nm)
        kept = c.values.shape[1]
        func = nm_kernel(n, k, batch, (c.n, c.m), kept, lanes)
        key = ("nm", n, k, batch, (c.n, c.m), kept, lanes)
        return SparseKernel(fmt, (n, k), batch, func, c.arrays(), key, {"nm": [c.n, c.m]})
    raise ConfigError(f"sparse format must be one of {FORMATS}, not {fmt!r}")


_BUILDS: dict[tuple, object] = {}


def build_kernel(kernel: SparseKernel, target):
    """Compile ``kernel.func`` for ``target`` (cached per kernel key and target)."""
    import tvm

    cache_key = (kernel.key, str(target))
    mod = _BUILDS.get(cache_key)
    if mod is None:
        func = kernel.func.with_attr("global_symbol", "sparse_kernel")
        try:
            mod = tvm.compile(tvm.IRModule({"sparse_kernel": func}), target=target)
        except Exception as e:
            raise CodegenUnsupported(f"TVM failed to build {kernel.key}: {e}") from e
        _BUILDS[cache_key] = mod
    return mod


def _args(kernel: SparseKernel, x: np.ndarray):
    import tvm

    n, k = kernel.shape
    x = np.asarray(x, np.float32).reshape(-1 if kernel.batch is None else kernel.batch, k)
    if kernel.layout == "rows":
        xin, out = x, np.zeros((x.shape[0], n), np.float32)
    else:
        xin, out = np.ascontiguousarray(x.T), np.zeros((n, x.shape[0]), np.float32)
    return ([tvm.runtime.tensor(np.ascontiguousarray(xin))]
            + [tvm.runtime.tensor(a) for a in kernel.weights] + [tvm.runtime.tensor(out)])  # fmt: skip


def run_kernel(kernel: SparseKernel, x: np.ndarray, target) -> np.ndarray:
    """``x[B, K] @ W.T`` through the compiled kernel (numpy in and out)."""
    args = _args(kernel, x)
    build_kernel(kernel, target)["sparse_kernel"](*args)
    y = args[-1].numpy()
    return y if kernel.layout == "rows" else y.T


def time_kernel(kernel: SparseKernel, target, number: int = 10, repeat: int = 3) -> float:
    """Best-of-``repeat`` mean seconds of one call on the host CPU."""
    import tvm

    rng = np.random.default_rng(0)
    args = _args(kernel, rng.standard_normal((kernel.batch, kernel.shape[1])))
    ev = build_kernel(kernel, target).mod.time_evaluator(
        "sparse_kernel", tvm.cpu(), number=number, repeat=repeat
    )
    return float(min(ev(*args).results))
