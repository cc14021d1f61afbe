"""Fold constant-only Relax arithmetic in numpy, before legalization.

torch.export hands BatchNorm's running statistics to the importer as constants (they are
buffers, not parameters), so after ``DecomposeOpsForInference`` and ``ConvertLayout`` every BN
leaves a chain ``expand_dims -> permute_dims -> add(eps) -> sqrt -> divide -> multiply ->
negative`` on constants alone in ``main``. ``LiftTransformParams`` does not lift it (it depends
on no parameter), so Relax's ``FoldConstant`` folded it after ``LegalizeOps``, compiling every
op of every chain as its own little LLVM module: 477 builds, ~2/3 of MobileNetV2's scheduling
stage (44 of 66 s on a loaded 2-core machine). :func:`fold_constants` evaluates those ops here,
in numpy, in microseconds.

Only ops whose numpy result is bit-identical to the compiled kernel's are folded: the layout
ops (``expand_dims``, ``reshape``, ``squeeze``, ``permute_dims``) and IEEE-exact float arithmetic
(``add``, ``subtract``, ``multiply``, ``divide``, ``sqrt``, ``negative``); anything else is left
to ``FoldConstant`` as before. A fold that would grow a constant (a broadcast to an activation's
shape) is left alone too. Runs at the end of :func:`graphprune.codegen.build.optimise`, before
``LiftTransformParams`` (CPU and CUDA, any schedule but ``stock``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate_in_numpy", "fold_constants"]

_BINARY = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide}
_UNARY = {"sqrt": np.sqrt, "negative": np.negative}
_LAYOUT = ("expand_dims", "reshape", "squeeze")
_FOLDABLE = {*_BINARY, *_UNARY, *_LAYOUT, "permute_dims", "nn.pad"}
# A folded constant may broadcast its operands up to this many elements (a (1, 1, 1, C) vector
# from a scalar and a vector); beyond that only when it is no larger than its largest operand.
_SMALL = 1 << 16


def _evaluate(name: str, call, arrays: list[np.ndarray], shape: tuple[int, ...], dtype: str):
    """The folded value of ``call`` (Relax op ``relax.<name>``) on ``arrays``, or ``None``."""
    try:
        np.dtype(dtype)
    except TypeError:  # bfloat16, float8, ...: numpy would round differently from TVM
        return None
    if any(a.dtype != np.dtype(dtype) for a in arrays if name not in _LAYOUT):
        return None  # a mixed-dtype op: leave its promotion rules to TVM
    floating = dtype in ("float16", "float32", "float64")
    with np.errstate(all="ignore"):  # inf/nan fold exactly as the kernel would compute them
        if name in _BINARY and floating and len(arrays) == 2:
            out = _BINARY[name](*(a.astype(dtype, copy=False) for a in arrays))
        elif name in _UNARY and floating and len(arrays) == 1:
            out = _UNARY[name](arrays[0].astype(dtype, copy=False))
        elif name in _LAYOUT:
            out = arrays[0]
        elif name == "permute_dims":
            axes = call.attrs.axes
            out = np.transpose(arrays[0], None if axes is None else [int(a) for a in axes])
        elif name == "nn.pad" and str(call.attrs.pad_mode) == "constant":
            w = [int(v) for v in call.attrs.pad_width]
            value = float(call.attrs.pad_value)
            out = np.pad(arrays[0], list(zip(w[::2], w[1::2])), constant_values=value)
        else:
            return None
    if out.size != int(np.prod(shape, dtype=np.int64)):
        return None
    return np.ascontiguousarray(np.asarray(out, dtype=dtype).reshape(shape))


def _array_of(const) -> np.ndarray | None:
    """A tensor constant's data; ``None`` for a scalar ``PrimValue`` argument (``T.int64(0)``: an
    op's axis or index, e.g. GPT-2's ``take``), which the numpy evaluation leaves alone."""
    data = getattr(const, "value", None)
    return data.numpy() if hasattr(data, "numpy") else None


def fold_constants():
    """A module pass: every call of a foldable op (module docstring) whose tensor arguments are
    constants, or variables bound to constants, becomes the constant it computes, in every Relax
    function. The now unused bindings are removed by ``DeadCodeElimination``.

    >>> mod = fold_constants()(mod)  # doctest: +SKIP
    """
    import tvm
    from graphprune.codegen.lower import each_function_pass
    from tvm import relax
    from tvm.ir.expr import Constant  # relax constants are GenericConst, a subclass

    foldable = _FOLDABLE

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def constant(self, e):
            if isinstance(e, relax.Var):
                bound = self.lookup_binding(e)
                e = bound if bound is not None else e
            return _array_of(e) if isinstance(e, Constant) else None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = call.op.name.removeprefix("relax.") if isinstance(call.op, tvm.ir.Op) else ""
            if name not in foldable:
                return call
            tensors = [a for a in call.args if not isinstance(a, (relax.ShapeExpr,))]
            arrays = [self.constant(a) for a in tensors]
            if not arrays or any(a is None for a in arrays):
                return call
            ty = self.builder_.normalize(call).ty
            if not isinstance(ty, relax.TensorType) or ty.shape is None:
                return call
            try:
                shape = tuple(int(d) for d in ty.shape.values)
            except TypeError:  # a symbolic extent
                return call
            size = int(np.prod(shape, dtype=np.int64))
            if size > _SMALL and size > max(a.size for a in arrays):
                return call
            value = _evaluate(name, call, arrays, shape, str(ty.dtype))
            return call if value is None else relax.const(value, str(ty.dtype))

    fold = each_function_pass("GraphPruneFoldConstants", _Fold)

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneFoldConstantsAndClean")
    def _pass(mod, _ctx):
        return relax.transform.DeadCodeElimination()(fold(mod))

    return _pass


def evaluate_in_numpy(func, weights: list[np.ndarray]) -> list[np.ndarray] | None:
    """The outputs of ``main_transform_params`` (``func``: what ``LiftTransformParams`` split
    off, one tuple parameter of weights) on ``weights``, evaluated in numpy where every op is
    one :func:`fold_constants` folds (CNN weight transforms are layout changes, BN folding and
    channel padding); ``None`` otherwise, and the caller compiles it. Saves the LLVM build of
    the transform (2.8 s CPU of MobileNetV2's 16 s compile)."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    env: dict = {}

    def value(e):
        if isinstance(e, Constant):
            return _array_of(e)
        return env.get(e)

    for block in func.body.blocks:
        for binding in block.bindings:
            v, out = binding.value, None
            if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(func.params[0]):
                out = weights[v.index]
            elif isinstance(v, relax.Tuple):
                fields = [value(f) for f in v.fields]
                out = None if any(f is None for f in fields) else fields
            elif isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                name = v.op.name.removeprefix("relax.")
                arrays = [value(a) for a in v.args if not isinstance(a, relax.ShapeExpr)]
                ty = binding.var.ty
                if name not in _FOLDABLE or any(a is None for a in arrays) or not (
                    isinstance(ty, relax.TensorType) and ty.shape is not None
                ):  # fmt: skip
                    return None
                try:
                    shape = tuple(int(d) for d in ty.shape.values)
                except TypeError:
                    return None
                out = _evaluate(name, v, arrays, shape, str(ty.dtype))
            elif isinstance(v, (relax.Var, Constant)):
                out = value(v)
            if out is None:
                return None
            env[binding.var] = out
    result = value(func.body.body)
    return list(result) if isinstance(result, list) else None
