"""Compressed sparse weight formats and their numpy compressors (CSR, BSR, N:M).

Input of every compressor is a *dense masked* Linear weight ``W[N, K]`` (out × in, PyTorch's layout;
pruned entries are exact zeros, as :func:`graphprune.sparsify` leaves them). Output is the arrays a
kernel in :mod:`.cpu_csr` / :mod:`.cpu_bsr` / :mod:`.cpu_nm` reads, plus :meth:`to_dense` (the test
oracle) and :meth:`nbytes` (the byte model the benchmark and the ``auto`` chooser quote). Runs at
compile time, before the Relax rewrite (:mod:`graphprune.codegen.sparse_rewrite`) binds the arrays
as weights.

Index widths: column indices are ``int16`` when the width allows (``K`` or the block-column count
below 2**15), which is what makes 90% CSR beat dense by more than 5× on bytes (6.7× bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.ir.errors import CodegenUnsupported

__all__ = [
    "CSRWeight", "BSRWeight", "NMWeight",
    "compress_csr", "compress_bsr", "compress_nm", "dense_nbytes", "nm_fits",
]  # fmt: skip

_INT16_LIMIT = 2**15


def _index_dtype(extent: int) -> np.dtype:
    return np.dtype("int16") if extent <= _INT16_LIMIT else np.dtype("int32")


def _check_2d(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise CodegenUnsupported(f"sparse formats need a 2-D weight, got shape {w.shape}")
    return np.ascontiguousarray(w, dtype=np.float32)


def dense_nbytes(shape: tuple[int, int]) -> int:
    """Bytes a dense fp32 ``W[N, K]`` moves."""
    return int(shape[0]) * int(shape[1]) * 4


@dataclass(frozen=True)
class CSRWeight:
    """Row-compressed ``W[N, K]``: row ``i`` holds ``data[indptr[i]:indptr[i+1]]`` at columns
    ``indices[...]``."""

    shape: tuple[int, int]
    data: np.ndarray  # float32 [nnz]
    indices: np.ndarray  # int16/int32 [nnz]
    indptr: np.ndarray  # int32 [N + 1]

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    def arrays(self) -> list[np.ndarray]:
        return [self.data, self.indices, self.indptr]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        out[rows, self.indices.astype(np.int64)] = self.data
        return out


def compress_csr(w: np.ndarray, index_dtype: str | None = None) -> CSRWeight:
    """CSR of the nonzeros of ``w``; ``index_dtype`` defaults to int16 where ``K`` allows.

    (The batch-1 kernel gathers activations with AVX-512 ``vgatherdps``, which takes int32
    lanes: there int32 indices measured faster than int16 ones despite the extra bytes.)

    Examples
    --------
    >>> c = compress_csr(np.array([[0, 2.0, 0], [0, 0, 0], [1.0, 0, 3.0]]))
    >>> c.indptr.tolist(), c.indices.tolist(), c.data.tolist()
    ([0, 1, 1, 3], [1, 0, 2], [2.0, 1.0, 3.0])
    """
    w = _check_2d(w)
    nz = w != 0
    rows, cols = np.nonzero(nz)
    indptr = np.zeros(w.shape[0] + 1, np.int32)
    np.cumsum(nz.sum(axis=1), out=indptr[1:])
    return CSRWeight(
        tuple(w.shape), w[rows, cols].astype(np.float32),
        cols.astype(index_dtype or _index_dtype(w.shape[1])), indptr,
    )  # fmt: skip


@dataclass(frozen=True)
class BSRWeight:
    """Block-row-compressed ``W[N, K]`` with ``R×C`` blocks (edges zero-padded).

    ``data[j]`` is block ``j`` stored *transposed* (``[C, R]``): the kernel's inner loop runs over
    the block's rows ``r`` for one input column ``c``, so ``r`` must be the contiguous axis.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    data: np.ndarray  # float32 [nnzb, C, R]
    indices: np.ndarray  # int16/int32 [nnzb] block column
    indptr: np.ndarray  # int32 [ceil(N/R) + 1]

    @property
    def nnzb(self) -> int:
        return int(self.indices.size)

    def arrays(self) -> list[np.ndarray]:
        return [self.data, self.indices, self.indptr]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def to_dense(self) -> np.ndarray:
        (n, k), (r, c) = self.shape, self.block
        nbr, nbc = -(-n // r), -(-k // c)
        out = np.zeros((nbr, nbc, r, c), np.float32)
        brow = np.repeat(np.arange(nbr), np.diff(self.indptr))
        out[brow, self.indices.astype(np.int64)] = self.data.transpose(0, 2, 1)
        return out.transpose(0, 2, 1, 3).reshape(nbr * r, nbc * c)[:n, :k]


def compress_bsr(w: np.ndarray, block: tuple[int, int]) -> BSRWeight:
    """BSR of ``w`` keeping every ``R×C`` block with a nonzero (``block=(R, C)``).

    Examples
    --------
    >>> b = compress_bsr(np.kron(np.eye(2), np.ones((2, 2))), (2, 2))
    >>> b.indptr.tolist(), b.indices.tolist(), b.data.shape
    ([0, 1, 2], [0, 1], (2, 2, 2))
    """
    w = _check_2d(w)
    r, c = (int(v) for v in block)
    if r < 1 or c < 1:
        raise CodegenUnsupported(f"BSR block must be positive, got {block}")
    n, k = w.shape
    nbr, nbc = -(-n // r), -(-k // c)
    padded = np.zeros((nbr * r, nbc * c), np.float32)
    padded[:n, :k] = w
    blocks = padded.reshape(nbr, r, nbc, c).transpose(0, 2, 3, 1)  # [nbr, nbc, C, R]
    keep = np.any(blocks != 0, axis=(2, 3))
    brow, bcol = np.nonzero(keep)
    indptr = np.zeros(nbr + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    data = np.ascontiguousarray(blocks[brow, bcol], dtype=np.float32).reshape(-1, c, r)
    return BSRWeight((n, k), (r, c), data, bcol.astype(_index_dtype(nbc)), indptr)


@dataclass(frozen=True)
class NMWeight:
    """N:M compressed ``W[N, K]`` along the reduction axis: each group of ``m`` inputs keeps
    ``n`` values, with their in-group offsets packed ``bits`` per uint32 lane-word.

    Per row the ``kept`` stream (group ``g`` owns entries ``g*n .. g*n+n-1``) is padded with zeros
    to a multiple of ``per_word = 32 // bits``, so that one word decodes to one SIMD vector of
    column indices: ``col = min((t // n) * m + offset, K - 1)`` (the clamp keeps padded lanes in
    bounds; their value is zero).
    """

    shape: tuple[int, int]
    n: int
    m: int
    values: np.ndarray  # float32 [N, kept_padded]
    packed: np.ndarray  # uint32 [N, kept_padded // per_word]

    @property
    def bits(self) -> int:
        return 2 if self.m <= 4 else 4

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def arrays(self) -> list[np.ndarray]:
        return [self.values, self.packed]

    def nbytes(self) -> int:
        return self.values.nbytes + self.packed.nbytes

    def offsets(self) -> np.ndarray:
        """In-group offsets ``[N, kept_padded]`` decoded from ``packed``."""
        shifts = (np.arange(self.per_word, dtype=np.uint32) * self.bits)[None, None, :]
        mask = np.uint32((1 << self.bits) - 1)
        off = (self.packed[:, :, None] >> shifts) & mask
        return off.reshape(self.packed.shape[0], -1).astype(np.int64)

    def columns(self) -> np.ndarray:
        t = np.arange(self.values.shape[1])
        return np.minimum((t // self.n)[None, :] * self.m + self.offsets(), self.shape[1] - 1)

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        rows = np.arange(self.shape[0])[:, None]
        np.add.at(out, (np.broadcast_to(rows, self.values.shape), self.columns()), self.values)
        return out


def nm_fits(w: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of ``w`` has at most ``n`` nonzeros."""
    w = _check_2d(w)
    rows, k = w.shape
    kp = -(-k // m) * m
    padded = np.zeros((rows, kp), bool)
    padded[:, :k] = w != 0
    return bool((padded.reshape(rows, -1, m).sum(axis=2) <= n).all())


def compress_nm(w: np.ndarray, n: int, m: int) -> NMWeight:
    """Pack ``w`` (at most ``n`` nonzeros per group of ``m`` along the inputs) as :class:`NMWeight`.

    Groups with fewer nonzeros (or a short tail group when ``m`` does not divide ``K``) are
    filled with explicit zeros at offsets that stay inside the matrix.

    Examples
    --------
    >>> c = compress_nm(np.array([[0, 5.0, 0, 7.0, 1.0, 0, 0, 0]]), 2, 4)
    >>> c.values[0, :4].tolist(), c.offsets()[0, :4].tolist()
    ([5.0, 7.0, 1.0, 0.0], [1, 3, 0, 1])
    """
    w = _check_2d(w)
    if not (1 <= n <= m <= 16):
        raise CodegenUnsupported(f"N:M needs 1 <= N <= M <= 16, got {n}:{m}")
    if not nm_fits(w, n, m):
        raise CodegenUnsupported(f"weight {w.shape} has a group with more than {n} of {m} nonzero")
    rows, k = w.shape
    groups = -(-k // m)
    padded = np.zeros((rows, groups * m), np.float32)
    padded[:, :k] = w
    g = padded.reshape(rows, groups, m)
    # Stable order: nonzeros first, in column order; then zeros at the lowest free offsets
    # (offsets < tail width, so a tail group never points outside K).
    order = np.argsort(g == 0, axis=2, kind="stable")[:, :, :n]
    vals = np.take_along_axis(g, order, axis=2).reshape(rows, groups * n)
    offs = order.reshape(rows, groups * n).astype(np.uint32)
    bits = 2 if m <= 4 else 4
    per_word = 32 // bits
    kept = -(-(groups * n) // per_word) * per_word
    values = np.zeros((rows, kept), np.float32)
    values[:, : groups * n] = vals
    offsets = np.zeros((rows, kept), np.uint32)
    offsets[:, : groups * n] = offs
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    packed = (offsets.reshape(rows, -1, per_word) << shifts).sum(axis=2, dtype=np.uint32)
    return NMWeight((rows, k), n, m, values, packed.astype(np.uint32))
