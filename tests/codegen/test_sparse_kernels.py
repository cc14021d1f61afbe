"""CPU sparse kernels (CSR, BSR, N:M) and their compressors against dense numpy math.

Oracle: ``x @ W.T`` in float64 on the *masked dense* weight. Builds are cached per kernel key
(sizes, not densities), and hypothesis draws from a small pool of shapes so the whole file
builds a few dozen kernels at most.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphprune.codegen.kernels import formats
from graphprune.codegen.kernels.cpu_common import PARALLEL_CHUNKS, balanced_row_split, simd_lanes
from graphprune.codegen.kernels.cpu_csr import csr_kernel
from graphprune.codegen.kernels.dispatch import SparseKernel, make_kernel, run_kernel
from graphprune.codegen.target import make_target
from graphprune.ir.errors import CodegenUnsupported

TARGET = make_target("llvm")
# Odd sizes and tails: not multiples of the block, the group, or the 16 SIMD lanes.
SHAPES = [(1, 1), (5, 7), (37, 53), (64, 96), (17, 130)]
BATCHES = [1, 3, 19, 64]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def random_mask(rng, shape, fmt, density, block=(4, 4), nm=(2, 4)):
    n, k = shape
    if fmt == "csr":
        return rng.random(shape) < density
    if fmt == "bsr":
        r, c = block
        blocks = rng.random((-(-n // r), -(-k // c))) < density
        return np.kron(blocks, np.ones((r, c), bool))[:n, :k]
    keep_n, m = nm
    g = -(-k // m)
    order = np.argsort(rng.random((n, g, m)), axis=2)
    keep = order < keep_n
    keep &= rng.random((n, g, 1)) < density  # some groups fully empty
    return keep.reshape(n, g * m)[:, :k]


def masked_weight(rng, shape, fmt, density, **kw):
    w = rng.standard_normal(shape).astype(np.float32)
    return w * random_mask(rng, shape, fmt, density, **kw)


def check(w, fmt, batch, rng, **kw):
    x = rng.standard_normal((batch, w.shape[1])).astype(np.float32)
    got = run_kernel(make_kernel(w, fmt, batch, **kw), x, TARGET)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(w.shape[1]))


@SETTINGS
@given(
    fmt=st.sampled_from(["csr", "bsr", "nm"]),
    shape=st.sampled_from(SHAPES),
    batch=st.sampled_from(BATCHES),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_dense_numpy(fmt, shape, batch, density, seed):
    rng = np.random.default_rng(seed)
    check(masked_weight(rng, shape, fmt, density), fmt, batch, rng)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
@pytest.mark.parametrize("batch", [1, 19])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_all_zero_and_all_kept(fmt, batch, density):
    """0% and 100% sparsity edge cases: an all-zero weight, and every allowed entry kept."""
    rng = np.random.default_rng(1)
    check(masked_weight(rng, (37, 53), fmt, density), fmt, batch, rng)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_empty_rows(fmt):
    rng = np.random.default_rng(2)
    w = masked_weight(rng, (37, 53), fmt, 0.6)
    w[::3] = 0.0
    w[:8] = 0.0  # a whole leading block row empty
    for batch in (1, 19):
        check(w, fmt, batch, rng)


@pytest.mark.parametrize("block", [(16, 1), (1, 8), (3, 5)])
@pytest.mark.parametrize("batch", [1, 19])
def test_bsr_block_shapes(block, batch):
    rng = np.random.default_rng(3)
    check(masked_weight(rng, (37, 53), "bsr", 0.4, block=block), "bsr", batch, rng, block=block)


@pytest.mark.parametrize("nm", [(1, 4), (4, 8), (2, 8)])
@pytest.mark.parametrize("batch", [1, 19])
def test_nm_patterns(nm, batch):
    rng = np.random.default_rng(4)
    check(masked_weight(rng, (37, 53), "nm", 1.0, nm=nm), "nm", batch, rng, nm=nm)


def test_nm_refuses_too_dense_groups():
    w = np.ones((2, 8), np.float32)
    assert not formats.nm_fits(w, 2, 4)
    with pytest.raises(CodegenUnsupported, match="more than 2 of 4"):
        make_kernel(w, "nm", 1)


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 70)),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_compressors_round_trip(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = masked_weight(rng, shape, "csr", density)
    np.testing.assert_array_equal(formats.compress_csr(w).to_dense(), w)
    for block in [(4, 4), (16, 1), (3, 5)]:
        np.testing.assert_array_equal(formats.compress_bsr(w, block).to_dense(), w)
    w_nm = masked_weight(rng, shape, "nm", density)
    c = formats.compress_nm(w_nm, 2, 4)
    np.testing.assert_array_equal(c.to_dense(), w_nm)
    assert c.packed.dtype == np.uint32 and c.values.shape[1] % c.per_word == 0


def test_index_width_and_byte_model():
    rng = np.random.default_rng(5)
    w = masked_weight(rng, (64, 40000), "csr", 0.1)
    assert formats.compress_csr(w).indices.dtype == np.int32  # K > 2**15
    w = masked_weight(rng, (64, 4096), "csr", 0.1)
    c = formats.compress_csr(w)
    assert c.indices.dtype == np.int16
    assert c.nbytes() == c.nnz * 6 + (64 + 1) * 4
    nm = formats.compress_nm(masked_weight(rng, (64, 4096), "nm", 1.0), 2, 4)
    # 2:4 fp32: 4 bytes per kept value + 2 bits of offset = 1.88x fewer bytes than dense
    assert formats.dense_nbytes((64, 4096)) / nm.nbytes() == pytest.approx(16 / 8.5)


@pytest.mark.parametrize("gather", ["staged", "insert", "vgather"])
@pytest.mark.parametrize("shape", [(37, 53), (5, 300)])
def test_csr_b1_gather_variants(shape, gather):
    """The other activation-gather forms of the batch-1 CSR kernel (int16 index folded into
    each load; vectorised inserts;
    AVX-512 ``vgatherdps``, which falls back to the staged form without AVX-512) compute the
    same thing, tails and empty rows included."""
    rng = np.random.default_rng(6)
    w = masked_weight(rng, shape, "csr", 0.4)
    w[1] = 0.0
    c = formats.compress_csr(w)
    lanes = simd_lanes(TARGET)
    func = csr_kernel(*shape, 1, str(c.indices.dtype), lanes, chunks=PARALLEL_CHUNKS,
                      gather=gather)  # fmt: skip
    arrays = c.arrays() + [balanced_row_split(c.indptr)]
    kern = SparseKernel("csr", shape, 1, func, arrays, ("csr-gather", gather, *shape))
    x = rng.standard_normal((1, shape[1])).astype(np.float32)
    np.testing.assert_allclose(run_kernel(kern, x, TARGET), x.astype(np.float64) @ w.T,
                               rtol=1e-4, atol=1e-4 * np.sqrt(shape[1]))  # fmt: skip


@pytest.mark.parametrize("k", [53, 40000])  # int16 and int32 indices: 4 or 2 per word
def test_csr_b1_word_gather_padded_rows(k):
    """The default batch-1 gather reads indices as uint64 words: rows are padded to whole words
    (explicit zeros), with rows of every length modulo 4 and empty rows."""
    rng = np.random.default_rng(7)
    w = masked_weight(rng, (23, k), "csr", 5.0 / k)
    w[3] = 0.0
    w[4, :5] = 1.0  # 5 nonzeros at least: one word and a remainder
    kern = make_kernel(w, "csr", 1)
    data, indices, indptr, _ = kern.weights
    assert (indptr % (8 // indices.itemsize) == 0).all() and data.size >= kern.detail["nnz"]
    check(w, "csr", 1, rng)


def test_balanced_row_split_evens_nonzeros():
    indptr = np.concatenate([[0], np.cumsum([400, 0, 0, 10, 10, 10, 10, 360])]).astype(np.int32)
    split = balanced_row_split(indptr, 2)
    assert split.tolist() == [0, 1, 8]  # 400 | 400 nonzeros
    assert balanced_row_split(np.zeros(4, np.int32), 4).tolist() == [0, 0, 0, 0, 3]
