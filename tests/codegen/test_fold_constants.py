"""fold_constants: constant-only BN arithmetic folded in numpy before legalization, bit-exact,
so FoldConstant compiles nothing (it built one LLVM module per op: 477 for MobileNetV2)."""

import numpy as np
import tvm
from graphprune.codegen.fold_constants import fold_constants
from tvm import relax


def _bn_like_module(mean, var, x_shape=(1, 1, 1, 8)):
    """main(x) = x * (1 / sqrt(permute(expand_dims(var)) + eps)) - exp(mean) [exp: not folded]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = bb.emit(relax.op.expand_dims(relax.const(var), [0, 2, 3]))  # (1, C, 1, 1)
            v = bb.emit(relax.op.permute_dims(v, [0, 2, 3, 1]))  # (1, 1, 1, C)
            s = bb.emit(relax.op.sqrt(relax.op.add(v, relax.const(1e-5, "float32"))))
            r = bb.emit(relax.op.divide(relax.const(1.0, "float32"), s))
            m = bb.emit(relax.op.exp(relax.const(mean)))
            y = bb.emit(relax.op.subtract(relax.op.multiply(x, r), m))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _op_names(func) -> list[str]:
    names = []
    relax.analysis.post_order_visit(
        func, lambda e: names.append(e.op.name) if isinstance(e, relax.Call) else None
    )
    return names


def _run(mod, x):
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_constant_chain_folds_bit_exactly_and_the_rest_stays():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(8).astype("float32")
    var = rng.random(8).astype("float32") + 0.1
    mod = _bn_like_module(mean, var)
    folded = fold_constants()(mod)
    ops = _op_names(folded["main"])
    for gone in ("relax.expand_dims", "relax.permute_dims", "relax.sqrt", "relax.divide"):
        assert gone not in ops, ops
    # exp is not IEEE-exact across libms: left to FoldConstant; x's ops stay
    assert {"relax.exp", "relax.multiply", "relax.subtract"} <= set(ops), ops
    x = rng.standard_normal((1, 1, 1, 8)).astype("float32")
    np.testing.assert_array_equal(_run(folded, x), _run(mod, x))


def test_a_broadcast_that_would_grow_a_constant_is_not_folded():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((256, 512), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            big = bb.emit(
                relax.op.add(
                    relax.const(np.ones((256, 1), "float32")),
                    relax.const(np.ones((1, 512), "float32")),
                )
            )
            out = bb.emit_output(bb.emit(relax.op.add(x, big)))
        bb.emit_func_output(out)
    folded = fold_constants()(bb.get())
    assert _op_names(folded["main"]).count("relax.add") == 2


def test_weight_transform_in_numpy_equals_the_compiled_one():
    """A CNN's lifted weight transform (HWIO layout, BN folded into scale/shift, channels
    padded) evaluated in numpy is bit-equal to the transform compiled and run by TVM."""
    import torch
    from graphprune.codegen.build import optimise
    from graphprune.codegen.fold_constants import evaluate_in_numpy
    from graphprune.codegen.lifted_weights import TRANSFORM, run_transform_params
    from graphprune.codegen.lower import lower
    from graphprune.codegen.target import make_target
    from torch import nn

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(13)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(3, 13, 3, padding=1, bias=False), bn, nn.ReLU(),
                          nn.Conv2d(13, 13, 3, padding=1, groups=13)).eval()  # fmt: skip
    lowered = lower(model, (torch.randn(1, 3, 12, 12),))
    padded: list = []
    mod = optimise(lowered.mod, make_target("llvm"), "ours", padded)
    weights = list(lowered.params)
    got = evaluate_in_numpy(mod[TRANSFORM], weights)
    want = run_transform_params(mod, weights)
    assert got is not None and len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_an_op_numpy_does_not_evaluate_leaves_the_transform_to_tvm():
    bb = relax.BlockBuilder()
    p = relax.Var("params", relax.TupleType([relax.TensorType((4,), "float32")]))
    with bb.function("main_transform_params", [p]):
        with bb.dataflow():
            w = bb.emit(relax.TupleGetItem(p, 0))
            out = bb.emit_output(relax.Tuple([bb.emit(relax.op.exp(w))]))
        bb.emit_func_output(out)
    from graphprune.codegen.fold_constants import evaluate_in_numpy

    assert evaluate_in_numpy(bb.get()["main_transform_params"], [np.ones(4, "float32")]) is None
