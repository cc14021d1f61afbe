"""The row-reduction CPU rule (codegen/cpu_reductions.py): which PrimFuncs it takes, and that what
it schedules computes the same as numpy, at static and symbolic row counts and row lengths; a
tiny BERT compiled static and dynamic runs its softmax and LayerNorm through it and matches torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from codegen_helpers import assert_matches, torch_outputs
from graphprune.codegen.build import PRESCHEDULED, cpu_rules, relax_pipeline, schedule_pass
from graphprune.codegen.cpu_reductions import RowReduction
from graphprune.codegen.target import detect_mcpu
from graphprune.models.hf import hf_bert_tiny
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from graphprune import codegen

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": detect_mcpu(), "num-cores": 2})


def _relax(kind: str, shape) -> tvm.IRModule:
    """``main`` applying ``kind`` to ``x`` of ``shape`` (str entries are symbolic), legalized
    and fused as the build does (``FastMathTransform`` first, as :func:`.build.optimise`)."""
    dims = [tirx.Var(d, "int64") if isinstance(d, str) else d for d in shape]
    x = relax.Var("x", relax.TensorType(dims, "float32"))
    g = relax.Var("g", relax.TensorType([dims[-1]], "float32"))
    bb = relax.BlockBuilder()
    params = [x] if kind in ("softmax", "max") else [x, g]
    with bb.function("main", params):
        with bb.dataflow():
            if kind == "softmax":  # with the epilogue FuseOps puts after it in attention
                p = bb.emit(relax.op.nn.softmax(x, axis=-1))
                out = relax.op.multiply(p, relax.const(2.0, "float32"))
            elif kind == "layer_norm":
                out = relax.op.nn.layer_norm(x, g, g, [-1], 1e-5)
            elif kind == "rms_norm":
                out = relax.op.nn.rms_norm(x, g, [-1], 1e-5)
            elif kind == "max":
                out = relax.op.max(x, axis=-1)
            elif kind == "mean_not_last":
                out = relax.op.add(relax.op.mean(x, axis=[1], keepdims=True), g)
            o = bb.emit_output(out)
        bb.emit_func_output(o)
    passes = [relax.transform.FastMathTransform()] + cpu_generic.legalize_passes(TARGET)
    with TARGET:
        return tvm.transform.Sequential(passes)(bb.get())


def _reference(kind: str, x, g):
    x64 = x.astype(np.float64)
    if kind == "softmax":
        e = np.exp(x64 - x64.max(-1, keepdims=True))
        return 2 * e / e.sum(-1, keepdims=True)
    if kind == "layer_norm":
        return (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(
            x64.var(-1, keepdims=True) + 1e-5
        ) * g + g
    if kind == "rms_norm":
        return x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * g
    return x64.max(-1)


def _build(kind, shape):
    report: dict[str, dict] = {}
    mod = _relax(kind, shape)
    with TARGET:
        mod = schedule_pass(cpu_rules(TARGET), TARGET, report)(mod)
    exe = tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET, PRESCHEDULED, {}))
    return relax.VirtualMachine(exe, tvm.cpu()), report


CASES = [
    ("softmax", [2, 3, 128], [2, 3, 128]),  # whole vectors: one pass per row
    ("softmax", [2, 3, 77], [2, 3, 77]),  # a tail: a loop nest per block
    ("softmax", ["b", 3, "s"], [2, 3, 77]),  # symbolic row count and row length
    ("softmax", ["b", 3, "s"], [1, 3, 128]),
    ("layer_norm", ["n", 768], [5, 768]),
    ("layer_norm", [4, 100], [4, 100]),
    ("rms_norm", ["b", "s", 64], [3, 7, 64]),
    ("rms_norm", ["b", "s", "d"], [2, 3, 50]),
    ("max", ["b", 96], [3, 96]),
]


@pytest.mark.parametrize("kind,shape,run", CASES, ids=[f"{k}-{s}" for k, s, _ in CASES])
def test_rule_schedules_row_reductions_and_matches_numpy(kind, shape, run):
    vm, report = _build(kind, shape)
    rules = {r["rule"] for r in report.values()}
    assert rules == {"RowReduction"}, report
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal(run)).astype("float32")
    g = rng.standard_normal(run[-1]).astype("float32")
    args = [x] if kind in ("softmax", "max") else [x, g]
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(out, _reference(kind, x, g), rtol=1e-5, atol=1e-5)


def test_rule_declines_what_is_not_a_last_axis_row_reduction():
    mod = _relax("mean_not_last", ["b", 8, 16])  # a mean over axis 1
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert funcs
    assert all(RowReduction().apply(f, TARGET, False) is None for f in funcs)
    matmul = _relax_matmul()
    assert RowReduction().apply(matmul, TARGET, False) is None  # a contraction: not ours


def _relax_matmul():
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([4, 32], "float32"))
    b = relax.Var("b", relax.TensorType([32, 16], "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            o = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(o)
    with TARGET:
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(TARGET))(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_tiny_bert_softmax_and_layer_norm_use_the_rule_and_match_torch(dynamic, tmp_path):
    model, inputs = hf_bert_tiny()  # hidden 64, 4 heads, inputs (2, 16)
    kw = {}
    if dynamic:
        batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=64)
        kw["dynamic_shapes"] = {"inputs": ({0: batch, 1: seq}, {0: batch, 1: seq})}
    art = codegen.compile(model, inputs, out_dir=tmp_path / "art", **kw)
    kernels = art.manifest["kernels"]
    for op in ("softmax", "layer_norm"):
        names = [n for n in kernels if op in n]
        assert names and all(kernels[n]["rule"] == "RowReduction" for n in names), kernels
    calls = [inputs]
    if dynamic:
        ids = torch.randint(0, 128, (3, 21), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0  # padding: masked keys in the softmax
        calls.append((ids, mask))
    for xs in calls:
        assert_matches(art(*xs), torch_outputs(model, xs))


@pytest.mark.parametrize("kind", ["softmax", "rms_norm"])
def test_symbolic_row_length_is_vectorised_with_a_peeled_tail(kind):
    """A symbolic row length (attention's key length in a dynamic artifact): every pass over
    the row runs whole vectors, then a scalar tail (codegen/tail_peel.py), and the result is
    right at lengths around the vector width: no tail, a tail only, both."""
    shape = ["b", 3, "s"] if kind == "softmax" else ["b", 3, "d"]
    vm, report = _build(kind, shape)
    assert {r["rule"] for r in report.values()} == {"RowReduction"}, report
    mod = _relax(kind, shape)
    func = next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    text = RowReduction().apply(func, TARGET, False).mod["main"].script()
    passes = 3 if kind == "softmax" else 2  # max, sum, output / sum of squares, output
    assert text.count("T.vectorized(") >= passes, text  # (+ vector inits of the partials)
    assert text.count("T.where(") == passes, text  # one predicated tail per pass
    rng = np.random.default_rng(0)
    for n in (1, 15, 16, 17, 33, 64):
        x = (3 * rng.standard_normal((2, 3, n))).astype("float32")
        g = rng.standard_normal(n).astype("float32")
        args = [x] if kind == "softmax" else [x, g]
        out = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
        np.testing.assert_allclose(out, _reference(kind, x, g), rtol=1e-5, atol=1e-5)
