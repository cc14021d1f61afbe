"""Register tiles of contractions with a symbolic outer row axis (issue 14: dynamic artifacts
within 10% of static).

A batch matmul ``[n, 128, 128] @ [n, 128, 64]`` with a symbolic ``n`` (a dynamic batch with a
fixed sequence; attention per head) had its symbolic ``n`` fused with the constant rows before
the register tile was split off, so the tile's row indices were ``(p * 4 + r) // 128`` and
``(p * 4 + r) % 128`` of the symbolic parallel loop ``p`` and the unrolled row ``r``. Built from
a te function with int32 constant extents this kept the tile in memory (0.80 ms vs 0.16 ms
static, 1 thread); from Relax's legalization (int64 throughout, what the pipeline schedules)
LLVM recovered the same inner loop as the static kernel. The rule now puts the symbolic axis
first in the parallel loop and splits only the constant rows, so no index of the tile divides
by anything. Checked on the schedule (the pinned part: the tile's row index is base + unrolled
row), on the generated x86 code (the FMA loop of the symbolic kernel touches memory no more than
the static one's, a guard) and on the result against numpy. The K-blocked schedule (Linears) had
the same fusion with batch and sequence both symbolic: BERT-base's attention output dense +
residual (1 layer, batch 2, seq 128, 1 thread) took 6.3 ms dynamic vs 1.9 ms static; the
sequence is now split alone (1.8 ms).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from graphprune.codegen.cpu_rules import Contraction
from graphprune.codegen.target import make_target
from tvm import relax, tirx
from tvm.script import relax as R

AVX512 = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _bmm(n, m=128, k=128, c=64):
    """``C[b] = A[b] @ B[b]`` (attention's Q.K^T / P.V per head), legalized by Relax as the
    pipeline sees it; ``n=None``: a symbolic batch."""
    n = tirx.Var("n", "int64") if n is None else n
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((n, m, k), "float32"))
    y = relax.Var("y", R.Tensor((n, k, c), "float32"))
    with bb.function("main", [x, y]):
        bb.emit_func_output(bb.emit(relax.op.matmul(x, y)))
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _schedule(n, target):
    rule = Contraction()
    sch = rule.apply(_bmm(n), make_target(target), False)
    assert sch is not None and rule.last_match is not None
    return sch, rule.last_match


def _fma_loop_memory_ops(asm: str) -> tuple[int, int]:
    """(FMAs, memory operands) of the basic block with the most FMAs: the register tile's
    inner loop (up to its branch). Loads of the operands are there either way; a tile kept in
    memory adds a load and a store per accumulator."""
    best = (0, 0)
    for body in re.split(r"\n\.?LBB\S*:", asm):
        body = re.split(r"\n\s*j\w+\s", body)[0]  # up to the block's branch
        lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("v")]
        fmas = sum(1 for ln in lines if ln.startswith("vfmadd"))
        mem = sum(1 for ln in lines if "(" in ln)
        if fmas > best[0]:
            best = (fmas, mem)
    return best


def test_symbolic_batch_does_not_enter_the_tile_index():
    sch, info = _schedule(None, AVX512)
    assert info.spatial == ("n", 128, 64)
    script = sch.mod.script()
    (nest,) = re.findall(r"for k in range.*?T\.reads", script, re.DOTALL)
    row_var = re.search(r"for (\w+) in T\.unroll", nest).group(1)  # the tile's rows
    batch = re.search(r"v_i0 = T\.axis\.spatial\(n, (.*)\)", nest).group(1)
    row = re.search(r"v_i1 = T\.axis\.spatial\(T\.int64\(128\), (.*)\)", nest).group(1)
    # the batch index is fixed for the whole tile, the row index is (base + unrolled row);
    # the fused schedule had (p * 4 + row) // 128 and (p * 4 + row) % 128
    assert row_var not in batch, batch
    assert row.endswith(f" + {row_var}") and row_var not in row[: -len(row_var)], row


@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_symbolic_batch_keeps_the_tile_in_registers(target):
    counts = {}
    for name, n in [("static", 12), ("symbolic", None)]:
        sch, _ = _schedule(n, target)
        lib = tvm.compile(sch.mod, target=make_target(target))
        counts[name] = _fma_loop_memory_ops(lib.mod.inspect_source("asm"))
    (fma_s, mem_s), (fma_d, mem_d) = counts["static"], counts["symbolic"]
    assert fma_s >= 8 and fma_d == fma_s, counts
    assert mem_d <= mem_s, counts  # a tile in memory: a load and a store more per FMA


def test_symbolic_batch_matches_numpy():
    target = make_target("llvm")
    lib = tvm.compile(_schedule(None, target)[0].mod, target=target)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    for n in (1, 5):
        a = rng.standard_normal((n, 128, 128), dtype=np.float32)
        b = rng.standard_normal((n, 128, 64), dtype=np.float32)
        out = tvm.runtime.tensor(np.zeros((n, 128, 64), "float32"), dev)
        lib["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), out)
        np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-4, atol=1e-4)


def _linear(b, s, k=768, c=768):
    """``[b, s, k] @ [k, c]``: a Linear of a dynamic-batch, dynamic-sequence model (K-blocked)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((b, s, k), "float32"))
    w = relax.Var("w", R.Tensor((k, c), "float32"))
    with bb.function("main", [x, w]):
        bb.emit_func_output(bb.emit(relax.op.matmul(x, w)))
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def test_k_blocked_symbolic_rows_tile_only_the_sequence():
    """Batch and sequence symbolic (BERT's attention output dense + residual ran 3.3x slower
    than static): the sequence is padded to whole tiles and split alone, the batch a loop of
    its own, instead of both fused and the unrolled row decomposed by their symbolic product."""
    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    target = make_target(AVX512)
    rule = Contraction()
    sch = rule.apply(_linear(b, s), target, False)
    assert sch is not None and rule.last_match.k_block, rule.last_match
    (nest,) = re.findall(r"for k_0.*?T\.reads", sch.mod.script(), re.DOTALL)
    row_var = re.search(r"for (\w+) in T\.unroll", nest).group(1)
    batch = re.search(r"v_i0 = T\.axis\.spatial\(b, (.*)\)", nest).group(1)
    row = re.search(r"v_i1 = T\.axis\.spatial\([^,]*\), (.*)\)", nest).group(1)
    assert row_var not in batch, batch
    assert row.endswith(f" + {row_var}") and row_var not in row[: -len(row_var)], row

    lib = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    w = rng.standard_normal((768, 768), dtype=np.float32)
    for shape in ((1, 7), (3, 16)):  # a padded tail, and whole tiles
        x = rng.standard_normal((*shape, 768), dtype=np.float32)
        out = tvm.runtime.tensor(np.zeros((*shape, 768), "float32"), dev)
        lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), out)
        np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-4, atol=1e-3)
