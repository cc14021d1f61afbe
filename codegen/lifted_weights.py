"""Evaluate the weight-only part of a model at build time: the artifact ships its results.

``relax.transform.LiftTransformParams`` moves every computation that depends on weights alone
(transposes of Linear weights, layout changes, BatchNorm folding, channel padding, and after
scheduling the weight *packing* our CPU rules ask for) out of ``main`` into a function
``main_transform_params``. :func:`graphprune.codegen.build.build` evaluates that function here
twice, each time right after a ``LiftTransformParams``: once after the Relax rewrites, once after
scheduling (the packing), and removes it from the module, so ``main`` takes the transformed
weights as they are shipped in ``weights.npz``.

Our rules' packing ``W[r..., c] -> Wp[c // bn, r..., c % bn]`` is evaluated in numpy
(:func:`pack_in_numpy`); anything else (MetaSchedule's layouts, BN arithmetic) is compiled for
the host CPU and run on TVM's VM (:func:`run_transform_params`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TRANSFORM", "evaluate_lifted_weights", "has_lifted_weights", "pack_in_numpy",
           "run_transform_params", "without_function"]  # fmt: skip

TRANSFORM = "main_transform_params"  # the name LiftTransformParams gives the lifted function


def has_lifted_weights(mod) -> bool:
    """Whether ``LiftTransformParams`` left a ``main_transform_params`` in ``mod``."""
    return TRANSFORM in [gv.name_hint for gv in mod.get_global_vars()]


def evaluate_lifted_weights(mod, weights: list[np.ndarray], ours_only: bool = False):
    """``(mod without main_transform_params, its outputs on weights)``; ``(mod, weights)``
    unchanged when there is none. ``ours_only``: every packed weight was packed by our rules
    (not MetaSchedule, whose ``*_weight_prepack`` functions may have the same shapes but
    another layout), so :func:`pack_in_numpy` may evaluate the packing."""
    if not has_lifted_weights(mod):
        return mod, weights
    packed = pack_in_numpy(mod[TRANSFORM], weights) if ours_only else None
    weights = packed if packed is not None else run_transform_params(mod, weights)
    return without_function(mod, TRANSFORM), weights


def pack_in_numpy(func, weights: list[np.ndarray]) -> list[np.ndarray] | None:
    """Evaluate a lifted transform that only selects weights and applies our packing
    ``W[r..., c] -> Wp[c // bn, r..., c % bn]`` (the ``*_weight_prepack`` PrimFuncs the split
    produces), with numpy; ``None`` for anything else, which is then compiled and run. Compiling
    those little PrimFuncs costs seconds per model; the reshape costs nothing."""
    import tvm
    from tvm import relax

    env: dict = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(func.params[0]):
                env[binding.var] = weights[value.index]
            elif (
                isinstance(value, relax.Call) and value.op.same_as(call_tir)
                and value.args[0].name_hint.endswith("_weight_prepack")
                and len(value.args[1].fields) == 1 and value.args[1].fields[0] in env
            ):  # fmt: skip
                w = env[value.args[1].fields[0]]
                out = tuple(int(d) for d in value.ty.shape.values)
                nb, bn = out[0], out[-1]
                if out[1:-1] != w.shape[:-1] or nb * bn != w.shape[-1]:
                    return None
                env[binding.var] = np.ascontiguousarray(
                    np.moveaxis(w.reshape(*w.shape[:-1], nb, bn), -2, 0)
                )
            elif isinstance(value, relax.Tuple) and all(f in env for f in value.fields):
                env[binding.var] = [env[f] for f in value.fields]
            else:
                return None
    result = env.get(func.body.body)
    return result if isinstance(result, list) else None


def without_function(mod, name: str):
    """``mod`` minus the function ``name`` (importers may already have added PrimFuncs, e.g. the
    ONNX Clip lowering, so both halves keep every other function)."""
    import tvm

    return tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != name})


def run_transform_params(mod, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Compile ``main_transform_params`` for the host CPU and run it on ``weights``."""
    import tvm
    from tvm import relax

    host = tvm.target.Target({"kind": "llvm"})
    entry = mod[TRANSFORM]
    used = {gv.name_hint for gv in relax.analysis.all_global_vars(entry)}
    # Only what the weight transform calls: the model's kernels are compiled once, for target.
    only = tvm.IRModule({
        gv: f for gv, f in mod.functions_items()
        if gv.name_hint == TRANSFORM or gv.name_hint in used
    })  # fmt: skip
    exe = tvm.compile(only, target=host)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm[TRANSFORM]([tvm.runtime.tensor(w) for w in weights])
    return [np.asarray(t.numpy(), order="C") for t in out]
