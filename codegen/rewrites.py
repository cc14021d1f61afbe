"""Relax graph rewrites that make a lowered model cheap to schedule on CPU.

Each function returns a module pass over the lowered Relax module (weights as parameters of
``main`` after its ``num_input`` inputs). :func:`graphprune.codegen.build.build` runs them, CPU
only, between ``DecomposeOpsForInference`` and ``LiftTransformParams``. Ordering rules:

* :func:`clip_as_min_max` runs **before** ``ConvertLayout``: it exists because ``clip`` has no
  layout rule (with any CPU schedule, ``ours`` and ``dlight``).
* :func:`decompose_gelu` runs **before** ``FastMathTransform``, which only swaps the ``erf`` /
  ``tanh`` calls it exposes for vectorisable polynomials (schedule ``ours``).
* :func:`divide_by_weights` runs **after** ``DecomposeOpsForInference`` (BatchNorm becomes the
  ``x / sqrt(var + eps)`` it rewrites) and **before** ``LiftTransformParams`` (which then
  precomputes the reciprocal).
* :func:`fold_affine_epilogues` runs **after** :func:`divide_by_weights` (BN's divide must
  already be the multiply it folds) and **before** ``LiftTransformParams`` (which precomputes
  the folded constants). ``build`` runs it after ``ConvertLayout`` and before
  :func:`graphprune.codegen.pad_channels.pad_channels`, which pads the folded constants.

All of them run **before** ``FuseTransposeMatmul`` and legalization (they match Relax ops, not
TIR). None of them changes what the model computes beyond float rounding (the gelu polynomial:
~1e-7 in float32).
"""

from __future__ import annotations

from graphprune.codegen.lower import each_function_pass, num_inputs

__all__ = [
    "clip_as_min_max", "decompose_gelu", "divide_by_weights", "fold_affine_epilogues",
    "matmul_without_broadcast_weights",
]  # fmt: skip


def clip_as_min_max():
    """``clip(x, lo, hi)`` (ReLU6) as ``minimum(maximum(x, lo), hi)``: Relax's ``clip`` has no
    layout rule, so ``ConvertLayout`` kept it in NCHW and wrapped every ReLU6 of an NHWC
    MobileNet in two transposes (two extra kernels and memory passes per block); the binary
    ops follow the layout of their tensor argument. Runs before ``ConvertLayout`` (CPU)."""
    from tvm import relax, tirx

    @relax.expr_functor.mutator
    class _Clip(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.clip" or len(call.args) != 3:
                return call
            x, lo, hi = call.args
            bounds = []
            for b in (lo, hi):  # a FloatImm, or a PrimValue holding one
                v = b if isinstance(b, (tirx.FloatImm, tirx.IntImm)) else getattr(b, "value", None)
                if not isinstance(v, (tirx.FloatImm, tirx.IntImm)):
                    return call
                bounds.append(float(v.value))
            if not isinstance(x.ty, relax.TensorType) or not str(x.ty.dtype).startswith("float"):
                return call
            dtype = str(x.ty.dtype)
            low = relax.op.maximum(x, relax.const(bounds[0], dtype))
            return relax.op.minimum(self.builder_.emit(low), relax.const(bounds[1], dtype))

    return each_function_pass("GraphPruneClipAsMinMax", _Clip)


def decompose_gelu():
    """``gelu(x)`` as ``x * (0.5 + 0.5 * erf(x / sqrt(2)))`` (``gelu_tanh`` likewise with tanh),
    so ``FastMathTransform`` can swap the libm ``erf``/``tanh``/``exp`` calls, which LLVM leaves
    scalar, for TOPI's vectorisable polynomials (float32 error ~1e-7, inside our 1e-4 tests)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Gelu(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name not in ("relax.nn.gelu", "relax.nn.gelu_tanh"):
                return call
            x = call.args[0]
            dtype = x.ty.dtype

            def c(v):
                return relax.const(v, dtype)

            if name == "relax.nn.gelu":
                inner = relax.op.erf(relax.op.multiply(x, c(0.7071067811865476)))
            else:
                cube = relax.op.multiply(relax.op.multiply(x, x), x)
                poly = relax.op.add(x, relax.op.multiply(cube, c(0.044715)))
                inner = relax.op.tanh(relax.op.multiply(poly, c(0.7978845608028654)))
            half = relax.op.add(c(0.5), relax.op.multiply(c(0.5), inner))
            return relax.op.multiply(x, half)

    return each_function_pass("GraphPruneDecomposeGelu", _Gelu)


def divide_by_weights():
    """``x / w`` with ``w`` computed from weights alone (BatchNorm's ``sqrt(var + eps)`` after
    ``DecomposeOpsForInference``) becomes ``x * (1 / w)``; ``LiftTransformParams`` then
    precomputes the reciprocal. A vector divide costs ~10x a multiply: in a conv epilogue with a
    short reduction (1x1 convs of pruned CNNs) it costs as much as the convolution."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant  # relax constants are GenericConst, a subclass

    divide = tvm.ir.Op.get("relax.divide")

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneDivideByWeights")
    def _pass(mod, _ctx):
        main = mod["main"]
        num_input = num_inputs(main)
        const = set(main.params[num_input:])  # vars whose value depends on weights only
        rewrites = {}
        for block in main.body.blocks:
            for b in block.bindings:
                v = b.value
                leaves = []
                if isinstance(v, relax.Call):
                    leaves = list(v.args)
                elif isinstance(v, (relax.Tuple,)):
                    leaves = list(v.fields)
                elif isinstance(v, relax.TupleGetItem):
                    leaves = [v.tuple_value]
                else:
                    leaves = [v]
                if all(isinstance(a, Constant) or a in const for a in leaves):
                    const.add(b.var)
                elif (
                    isinstance(v, relax.Call) and v.op.same_as(divide)
                    and (isinstance(v.args[1], Constant) or v.args[1] in const)
                    and isinstance(v.args[1].ty, relax.TensorType)
                    and str(v.args[1].ty.dtype).startswith("float")
                ):  # fmt: skip
                    rewrites[b.var] = v
        if not rewrites:
            return mod

        @relax.expr_functor.mutator
        class _Rewrite(relax.PyExprMutator):
            def visit_var_binding_(self, binding):
                v = rewrites.get(binding.var)
                if v is None:
                    return super().visit_var_binding_(binding)
                x, w = self.visit_expr(v.args[0]), self.visit_expr(v.args[1])
                one = relax.const(1.0, str(w.ty.dtype))
                recip = self.builder_.emit(relax.op.divide(one, w))
                # rebind the same var: later uses need no remapping
                scaled = self.builder_.normalize(relax.op.multiply(x, recip))
                self.builder_.emit_normalized(relax.VarBinding(binding.var, scaled))

        rewriter = _Rewrite(mod)
        rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(main))
        return rewriter.builder_.get()

    return _pass


def fold_affine_epilogues():
    """Collapse chains of elementwise ``subtract``/``multiply``/``add`` by weight-only values
    into one ``multiply`` and one ``add``: BatchNorm after ``DecomposeOpsForInference`` is
    ``((y - mean) * (1 / std)) * gamma + beta``, four vector ops per output element in a conv's
    epilogue. With the short reductions of pruned 1x1 and depthwise convs (9-16 MACs per
    output) those ops cost a fifth of the layer and do not shrink with pruning, so latency
    lagged the MAC count. The folded constants are weight-only and ``LiftTransformParams``
    precomputes them. Rules (``c``, ``d`` weight-only)::

        (y - c) * d  ->  y * d + (-(c * d))        (y * c) * d  ->  y * (c * d)
        (y + c) * d  ->  y * d + c * d             (y + c) + d  ->  y + (c + d)
    """
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    ops = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("add", "subtract", "multiply")}

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def __init__(self, mod, weights):
            super().__init__(mod)
            self.weights = weights
            self.memo = {}

        def is_const(self, e) -> bool:
            if isinstance(e, Constant) or any(e.same_as(w) for w in self.weights):
                return True
            if not isinstance(e, relax.Var):
                return False
            key = e.vid if hasattr(e, "vid") else e
            if key not in self.memo:
                self.memo[key] = False
                b = self.lookup_binding(e)
                if isinstance(b, relax.Call) and isinstance(b.op, tvm.ir.Op):
                    self.memo[key] = all(self.is_const(a) for a in b.args)
            return self.memo[key]

        def producer(self, e, name):
            b = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            if isinstance(b, relax.Call) and b.op.same_as(ops[name]) and self.is_const(b.args[1]):
                return b.args[0], b.args[1]
            return None

        def emit(self, e):
            return self.builder_.emit(e)

        def mul(self, x, d):
            if (p := self.producer(x, "subtract")) is not None:
                y, c = p
                return relax.op.add(self.emit(relax.op.multiply(y, d)),
                                    self.emit(relax.op.negative(relax.op.multiply(c, d))))  # fmt: skip
            if (p := self.producer(x, "multiply")) is not None:
                y, c = p
                return relax.op.multiply(y, self.emit(relax.op.multiply(c, d)))
            if (p := self.producer(x, "add")) is not None:
                y, c = p
                return relax.op.add(self.emit(self.mul(y, d)),
                                    self.emit(relax.op.multiply(c, d)))  # fmt: skip
            return None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or len(call.args) != 2:
                return call
            x, d = call.args
            if not (isinstance(d.ty, relax.TensorType) and str(d.ty.dtype).startswith("float")):
                return call
            if not self.is_const(d) or self.is_const(x) or x.ty.shape is None:
                return call
            try:  # only where the folded constant broadcasts into x's shape (no growth)
                if tuple(call.ty.shape) != tuple(x.ty.shape):
                    return call
            except TypeError:
                return call
            folded = None
            if call.op.same_as(ops["multiply"]):
                folded = self.mul(x, d)
            elif call.op.same_as(ops["add"]) and (p := self.producer(x, "add")) is not None:
                folded = relax.op.add(p[0], self.emit(relax.op.add(p[1], d)))
            return call if folded is None else folded

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneFoldAffineEpilogues")
    def _pass(mod, _ctx):
        main = mod["main"]
        num_input = num_inputs(main)
        rewriter = _Fold(mod, list(main.params[num_input:]))
        rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(main))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass


def matmul_without_broadcast_weights():
    """``matmul(a, broadcast_to(w, (b..., K, N)))`` with a 2-D ``w`` as ``matmul(a, w)`` (the
    same by matmul's own broadcasting), and ``broadcast_to`` to an operand's own shape as the
    operand. torch.export with a dynamic batch spells a Linear on a permuted activation (BERT's
    attention output) as ``bmm(x, expand(W.T))``: the broadcast copied the weight per sample on
    every call and hid it from weight packing (an unpacked batched matmul). Runs before
    ``LiftTransformParams``; the dead broadcasts are removed by ``DeadCodeElimination``."""
    from tvm import relax

    def _same_shape(x, shape) -> bool:
        ty = getattr(x, "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return False
        return [str(v) for v in ty.shape.values] == [str(v) for v in shape]

    @relax.expr_functor.mutator
    class _Matmul(relax.PyExprMutator):
        def _bound(self, var):
            value = self.lookup_binding(var) if isinstance(var, relax.Var) else None
            if getattr(value, "op", None) is not None and getattr(value.op, "name", "") == (
                "relax.broadcast_to"
            ):
                return value
            return None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.matmul":
                return call
            a, b = call.args
            ba, bb = self._bound(a), self._bound(b)
            if ba is not None and _same_shape(ba.args[0], ba.args[1].values):
                a = ba.args[0]
            if bb is not None and _same_shape(bb.args[0], bb.args[1].values):
                b = bb.args[0]
            elif bb is not None:
                w = bb.args[0]
                shape = list(bb.args[1].values)
                wty = getattr(w, "ty", None)
                if (
                    isinstance(wty, relax.TensorType)
                    and wty.ndim == 2
                    and len(shape) >= 3
                    and _same_shape(w, shape[-2:])
                    and getattr(a.ty, "ndim", 0) == len(shape)
                ):
                    b = w
            if a.same_as(call.args[0]) and b.same_as(call.args[1]):
                return call
            return relax.op.matmul(a, b, out_dtype=call.attrs.out_dtype)

    return each_function_pass("GraphPruneMatmulWithoutBroadcastWeights", _Matmul)
