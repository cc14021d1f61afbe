"""From a lowered Relax module to a TVM Executable plus the weights it expects.

Ordering (each step's precondition is the previous one's result):

1. ``DecomposeOpsForInference`` — batch norm becomes arithmetic on parameters, so step 3 can
   precompute its scale and shift.
2. CPU only: ``ConvertLayout`` to NHWC/HWIO, so the output channel is the innermost axis of
   activations and weights (what :mod:`.cpu_rules` vectorises).
3. ``LiftTransformParams`` — every computation that depends only on weights (transposes of Linear
   weights, layout changes, BN folding) moves to ``main_transform_params``, which we run once
   here; the artifact ships its *outputs*. A Linear is then a plain ``X @ Wt`` with a
   contiguous weight row per reduction step, which our CPU kernel needs. On CPU we therefore do
   not run ``FuseTransposeMatmul`` on weights: an NT matmul would make the vectorised axis
   strided. On CUDA it runs (dlight's matmul rule handles NT).
   CPU with our schedule also rewrites, before lifting: ``gelu`` into ``erf`` arithmetic and
   ``FastMathTransform`` (vectorisable ``erf``/``exp``/``tanh``), and ``x / w`` with a
   weight-only ``w`` (BN) into ``x * (1 / w)``; BN epilogues fold to one multiply-add, and
   channel groups whose width wastes the vector are padded with zero weights
   (:mod:`.pad_channels`; the manifest lists them under ``padded_channels``). Before
   ``ConvertLayout``, ``clip`` (ReLU6) becomes ``minimum(maximum(...))``, which has a layout
   rule.
4. Legalize, fuse (stock passes), then **schedule**: our rules (CPU) or ``dlight`` (CUDA) or
   nothing (``schedule="stock"``, the baseline of the benchmark). With ``tune=True`` (CPU)
   MetaSchedule first schedules the kernels its database has faster records for
   (:mod:`.tuning`); our rules take the rest. On CPU our rules repack weight
   operands; ``SplitLayoutRewritePreproc`` and a second ``LiftTransformParams`` move the packing
   out of ``main`` and it is evaluated once here (:func:`_schedule_cpu`).
5. The stock VM lowering passes, then ``tvm.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphprune.codegen.cpu_rules import Contraction, Injective, vector_lanes
from graphprune.codegen.pad_channels import pad_channels
from graphprune.codegen.lower import LoweredModel, each_function_pass, num_inputs
from graphprune.ir.errors import CodegenUnsupported, ConfigError

__all__ = ["Built", "build", "SCHEDULES"]

SCHEDULES = ("ours", "stock", "dlight")


@dataclass
class Built:
    """A compiled module and the weights to pass after the inputs of ``main``."""

    executable: object  # tvm.relax.Executable
    weights: list[np.ndarray]
    kernels: dict[str, dict] = field(default_factory=dict)
    tuning: dict | None = None  # TuningReport.to_json() when tuned
    padded_channels: list[dict] = field(default_factory=list)  # see pad_channels.pad_channels


def _cpu_rules(target):
    from tvm.s_tir import dlight

    return [Contraction(), Injective(), dlight.cpu.GEMV(), dlight.cpu.Reduction()]


def _schedule_pass(rules, target, report: dict):
    """Apply the first matching rule to each PrimFunc; record which one in ``report``."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
                continue
            choice = {"rule": "unscheduled", "sparsity": "dense"}
            for rule in rules:
                sch = rule.apply(func, target, False)
                if sch is None:
                    continue
                sch = sch[0] if isinstance(sch, list) else sch
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                choice = {"rule": type(rule).__name__, "sparsity": "dense"}
                match = getattr(rule, "last_match", None)
                if match is not None:
                    choice.update(
                        spatial=list(match.spatial), reduce=list(match.reduce),
                        tile_rows=match.tile[0], tile_col_vectors=match.tile[1],
                        vector_lanes=match.tile[2],
                    )  # fmt: skip
                    if match.packed:
                        choice["packed_weight"] = match.packed
                    if match.k_block:
                        choice["k_block"] = match.k_block
                break
            report[gv.name_hint] = choice
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _relax_pipeline(target, schedule: str, report: dict):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    if target.kind.name == "cuda":
        if schedule == "stock":
            raise ConfigError("schedule='stock' is CPU-only: CUDA kernels need thread bindings")
        return relax.get_default_pipeline(target)
    if schedule == "scheduled":  # legalized and scheduled already (see _schedule_cpu)
        passes = []
    else:
        passes = cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
    if schedule == "ours":
        passes.append(_schedule_pass(_cpu_rules(target), target, report))
    elif schedule == "dlight":
        from tvm.s_tir import dlight

        passes.append(dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()))
    passes += cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _clip_as_min_max():
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


def _decompose_gelu():
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


def _divide_by_weights():
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


def _fold_affine_epilogues():
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


def _schedule_cpu(mod, weights: list[np.ndarray], target, report: dict, step, tuning=None):
    """Legalize, fuse and schedule with our CPU rules, then prepack weights.

    The rules repack weight operands into contiguous panels (``layout_rewrite_preproc`` blocks,
    only for the buffers ``AttachAttrLayoutFreeBuffers`` marks as weights);
    ``SplitLayoutRewritePreproc`` moves those blocks into their own PrimFuncs and a second
    ``LiftTransformParams`` lifts them out of ``main``, so the artifact ships packed weights and
    the model pays nothing for the layout at run time.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    passes = cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
    passes.append(_mark_weight_buffers())
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    if tuning is not None:  # MetaSchedule: database records replace our rules where faster
        from graphprune.codegen.tuning import tune_and_apply

        mod, tuning["summary"] = tune_and_apply(
            mod, target, tuning["trials"], tuning["dir"], _cpu_rules(target), report, step
        )
    passes = [
        _schedule_pass(_cpu_rules(target), target, report),
        _split_layout_rewrite(report),
        relax.transform.LiftTransformParams(),
    ]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    for name in [n for n in report if f"{n}_prepacked" in names]:
        report[f"{name}_prepacked"] = report.pop(name)  # the split keeps the compute half
    if "main_transform_params" in [gv.name_hint for gv in mod.get_global_vars()]:
        step("packing weights")
        # Only our rules' packing is known to be W[r..., c] -> Wp[c // bn, r..., c % bn]; a
        # MetaSchedule layout is computed by compiling the transform.
        ours = tuning is None or not any(r.get("packed_weight") is True for r in report.values())
        packed = _pack_in_numpy(mod["main_transform_params"], weights) if ours else None
        weights = packed if packed is not None else _run_transform_params(mod, weights)
        mod = _without(mod, "main_transform_params")
    return mod, weights


def _pack_in_numpy(func, weights: list[np.ndarray]) -> list[np.ndarray] | None:
    """Evaluate a lifted transform that only selects weights and applies our packing
    ``W[r..., c] -> Wp[c // bn, r..., c % bn]`` (the ``*_weight_prepack`` PrimFuncs the split
    produces), with numpy; ``None`` for anything else, which is then compiled and run. Compiling
    those little PrimFuncs costs seconds per model; the reshape costs nothing."""
    from tvm import relax

    env: dict = {}
    result = None
    call_tir = tvm_op("relax.call_tir")
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


def tvm_op(name: str):
    import tvm

    return tvm.ir.Op.get(name)


def _mark_weight_buffers():
    """Set ``layout_free_buffers`` on each unscheduled PrimFunc: the argument positions that
    receive a weight of ``main`` at every call site (what the rules may repack). Like Relax's
    ``AttachAttrLayoutFreeBuffers``, which however copies every PrimFunc, hand-written sparse
    kernels included, and breaks those with symbolic shapes."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneMarkWeightBuffers")
    def _pass(mod, _ctx):
        main = mod["main"]
        num_input = num_inputs(main)
        weights = {p for p in main.params[num_input:]}
        call_tir = tvm.ir.Op.get("relax.call_tir")
        free: dict[str, set[int]] = {}

        def visit(e):
            if isinstance(e, relax.Call) and e.op.same_as(call_tir):
                args = e.args[1].fields if isinstance(e.args[1], relax.Tuple) else [e.args[1]]
                idx = {i for i, a in enumerate(args) if any(a.same_as(w) for w in weights)}
                name = e.args[0].name_hint
                free[name] = free[name] & idx if name in free else idx

        relax.analysis.post_order_visit(main.body, visit)
        updates = {}
        for gv, f in mod.functions_items():
            if not isinstance(f, tirx.PrimFunc) or not free.get(gv.name_hint):
                continue
            if "tirx.is_scheduled" in f.attrs:
                continue
            updates[gv] = f.with_attr("layout_free_buffers", sorted(free[gv.name_hint]))
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


def _split_layout_rewrite(report: dict):
    """``SplitLayoutRewritePreproc`` on the PrimFuncs our rules packed only: it requires a root
    block, which hand-written kernels (the sparse ones) do not have."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneSplitLayoutRewrite")
    def _pass(mod, _ctx):
        packed = {n for n, r in report.items() if r.get("packed_weight")}
        aside = {
            gv: f for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and gv.name_hint not in packed
        }  # fmt: skip
        if not packed:
            return mod
        rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in aside})
        rest = relax.transform.SplitLayoutRewritePreproc()(rest)
        return tvm.IRModule({**dict(rest.functions_items()), **aside})

    return _pass


def _without(mod, name: str):
    """``mod`` minus the function ``name`` (importers may already have added PrimFuncs, e.g. the
    ONNX Clip lowering, so both halves keep every other function)."""
    import tvm

    return tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != name})


def _run_transform_params(mod, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Compile ``main_transform_params`` for the host CPU and run it on ``weights``."""
    import tvm
    from tvm import relax

    host = tvm.target.Target({"kind": "llvm"})
    entry = mod["main_transform_params"]
    used = {gv.name_hint for gv in relax.analysis.all_global_vars(entry)}
    # Only what the weight transform calls: the model's kernels are compiled once, for target.
    only = tvm.IRModule({
        gv: f for gv, f in mod.functions_items()
        if gv.name_hint == "main_transform_params" or gv.name_hint in used
    })  # fmt: skip
    exe = tvm.compile(only, target=host)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main_transform_params"]([tvm.runtime.tensor(w) for w in weights])
    return [np.ascontiguousarray(t.numpy()) for t in out]


def build(
    lowered: LoweredModel, target, schedule: str = "ours", progress=None, tuning: dict | None = None
) -> Built:
    """Optimise, schedule and compile ``lowered`` for ``target`` (a ``tvm.target.Target``).

    ``tuning`` (``{"trials": N, "dir": path}``) runs MetaSchedule on the CPU kernels with a
    database in ``dir`` (:mod:`.tuning`); its summary is returned in ``Built.tuning``."""
    import tvm
    from tvm import relax

    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    if tuning is not None and (target.kind.name != "llvm" or schedule != "ours"):
        raise ConfigError(
            "tune=True is implemented for CPU targets with schedule='ours' (it seeds the search "
            "with our rules and keeps the faster); CUDA uses dlight's rules untuned"
        )
    step = progress or (lambda msg: None)
    mod = lowered.mod
    weights = list(lowered.params)
    is_cpu = target.kind.name == "llvm"
    padded: list[dict] = []
    if schedule != "stock":
        step("optimising (decompose BN, layout, lift weight transforms)")
        seq = [relax.transform.DecomposeOpsForInference()]
        if is_cpu:
            # conv2d_transpose has no NHWC legalization: pin it to NCHW so the layout
            # propagation from its NHWC neighbours does not convert it.
            layouts = {
                "relax.nn.conv2d": ["NHWC", "HWIO"],
                "relax.nn.conv2d_transpose": ["NCHW", "IOHW"],
            }
            seq += [_clip_as_min_max(), relax.transform.ConvertLayout(layouts)]
        if is_cpu and schedule == "ours":
            seq += [_decompose_gelu(), relax.transform.FastMathTransform(), _divide_by_weights(),
                    _fold_affine_epilogues(),
                    pad_channels(vector_lanes(target), padded)]  # fmt: skip
        seq.append(relax.transform.LiftTransformParams())
        mod = tvm.transform.Sequential(seq)(mod)
        if "main_transform_params" in [gv.name_hint for gv in mod.get_global_vars()]:
            step("precomputing transformed weights")
            weights = _run_transform_params(mod, weights)
            mod = _without(mod, "main_transform_params")
        if not is_cpu:
            mod = relax.transform.FuseTransposeMatmul()(mod)
    report: dict[str, dict] = {}
    step(f"legalising, fusing, scheduling ({schedule}) and building for {target.kind.name}")
    try:
        stage = schedule
        if is_cpu and schedule == "ours":
            mod, weights = _schedule_cpu(mod, weights, target, report, step, tuning)
            stage = "scheduled"
        exe = tvm.compile(mod, target=target, relax_pipeline=_relax_pipeline(target, stage, report))
    except (ConfigError, CodegenUnsupported):
        raise
    except Exception as e:
        raise CodegenUnsupported(f"TVM failed to build the model for {target}: {e}") from e
    summary = tuning.get("summary") if tuning else None
    return Built(exe, weights, report, summary.to_json() if summary else None, padded)
