"""From a lowered Relax module to a TVM Executable plus the weights it expects.

Runs after :mod:`.lower` and the sparse rewrite (:mod:`.sparse_rewrite`, which must see the
importers' ``permute_dims(W)`` before ``LiftTransformParams`` lifts it). Four named stages, each
one's precondition the previous one's result (``schedule="stock"`` skips stages 1-3):

1. **optimise** (:func:`optimise`): ``DecomposeOpsForInference`` (batch norm becomes arithmetic
   on parameters); CPU: :func:`.rewrites.clip_as_min_max` then ``ConvertLayout`` to NHWC/HWIO,
   so the output channel is the innermost axis of activations and weights (what :mod:`.cpu_rules`
   vectorises); CPU with our schedule: the other :mod:`.rewrites` (gelu as ``erf`` arithmetic +
   ``FastMathTransform``, ``x / w`` as ``x * (1 / w)``, folded BN epilogues) and channel padding
   (:mod:`.pad_channels`, listed in the manifest under ``padded_channels``); then
   :func:`.fold_constants.fold_constants` (constant-only chains such as BN statistics, in numpy:
   ``FoldConstant`` would compile every op of them separately during legalization) and
   ``LiftTransformParams``. :mod:`.rewrites` states their ordering rules.
2. **evaluate lifted weights** (:func:`.lifted_weights.evaluate_lifted_weights`): the
   ``main_transform_params`` that ``LiftTransformParams`` split off (transposes of Linear weights,
   layout changes, BN folding) is *run now*, at build time, and dropped; the artifact ships its
   outputs. A Linear is then a plain ``X @ Wt`` with a contiguous weight row per reduction step,
   which our CPU kernel needs, so on CPU we do not run ``FuseTransposeMatmul`` on weights (an NT
   matmul would make the vectorised axis strided). On CUDA it runs (dlight's matmul rule handles
   NT).
3. **schedule ahead of compile** (:func:`schedule_cpu`, CPU with ``schedule="ours"`` only):
   legalize and fuse (stock passes), mark weight buffers, optionally MetaSchedule
   (``tune=True``, :mod:`.tuning`: it takes the kernels its database has faster records for),
   our rules for the rest (:func:`schedule_pass`, which records each kernel's rule in the
   manifest); the rules repack weight operands, and ``SplitLayoutRewritePreproc`` plus a
   second ``LiftTransformParams`` move the packing out of ``main``; stage 2 then runs again on
   the packing (**pack weights**). The module leaves this stage legalized and scheduled, so
   stage 4 runs the pipeline named :data:`PRESCHEDULED`: VM lowering only.
4. **compile**: ``tvm.compile`` with :func:`relax_pipeline`: for the other schedules it
   legalizes, fuses and schedules inside (``"stock"``: nothing, the benchmark's baseline;
   ``"dlight"``: dlight's CPU rules; CUDA: TVM's default pipeline, dlight GPU rules), then the
   stock VM lowering passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphprune.codegen.cpu_reductions import RowReduction
from graphprune.codegen.cpu_rules import Contraction, Injective, vector_lanes
from graphprune.codegen.fold_constants import evaluate_in_numpy, fold_constants
from graphprune.codegen.lifted_weights import (
    TRANSFORM,
    evaluate_lifted_weights,
    has_lifted_weights,
    without_function,
)
from graphprune.codegen.lower import LoweredModel, num_inputs
from graphprune.codegen.pad_channels import pad_channels
from graphprune.codegen.rewrites import (
    clip_as_min_max,
    decompose_gelu,
    divide_by_weights,
    fold_affine_epilogues,
    matmul_without_broadcast_weights,
)
from graphprune.ir.errors import CodegenUnsupported, ConfigError

__all__ = ["PRESCHEDULED", "SCHEDULES", "Built", "build", "optimise", "relax_pipeline",
           "schedule_cpu"]  # fmt: skip

SCHEDULES = ("ours", "stock", "dlight")
# Stage 4's pipeline after stage 3 (schedule_cpu) ran: the module is legalized and scheduled.
PRESCHEDULED = "prescheduled"


@dataclass
class Built:
    """A compiled module and the weights to pass after the inputs of ``main``."""

    executable: object  # tvm.relax.Executable
    weights: list[np.ndarray]
    kernels: dict[str, dict] = field(default_factory=dict)
    tuning: dict | None = None  # TuningReport.to_json() when tuned
    padded_channels: list[dict] = field(default_factory=list)  # see pad_channels.pad_channels


def cpu_rules(target):
    """Our CPU schedule rules, in the order they are tried."""
    from tvm.s_tir import dlight

    return [Contraction(), RowReduction(), Injective(), dlight.cpu.GEMV(), dlight.cpu.Reduction()]


def schedule_pass(rules, target, report: dict):
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
                    if match.row_blocks > 1:
                        choice["row_blocks"] = match.row_blocks
                break
            report[gv.name_hint] = choice
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def relax_pipeline(target, schedule: str, report: dict):
    """Stage 4's pipeline for ``tvm.compile``: ``schedule`` is one of :data:`SCHEDULES`, or
    :data:`PRESCHEDULED` after :func:`schedule_cpu`."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    if target.kind.name == "cuda":
        if schedule == "stock":
            raise ConfigError("schedule='stock' is CPU-only: CUDA kernels need thread bindings")
        return relax.get_default_pipeline(target)
    if schedule == PRESCHEDULED:  # stage 3 legalized and scheduled it already
        passes = []
    else:
        passes = cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
    if schedule == "ours":
        passes.append(schedule_pass(cpu_rules(target), target, report))
    elif schedule == "dlight":
        from tvm.s_tir import dlight

        passes.append(dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()))
    passes += cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0, name="GraphPruneCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def optimise(mod, target, schedule: str, padded: list[dict]):
    """Stage 1: the Relax rewrites and layout for ``target`` and ``schedule``, then
    ``LiftTransformParams``. ``padded`` receives the channel groups :mod:`.pad_channels` widened."""
    import tvm
    from tvm import relax

    seq = [
        relax.transform.DecomposeOpsForInference(),
        matmul_without_broadcast_weights(),
        relax.transform.DeadCodeElimination(),
    ]
    is_cpu = target.kind.name == "llvm"
    if is_cpu:
        # conv2d_transpose has no NHWC legalization: pin it to NCHW so the layout
        # propagation from its NHWC neighbours does not convert it.
        layouts = {
            "relax.nn.conv2d": ["NHWC", "HWIO"],
            "relax.nn.conv2d_transpose": ["NCHW", "IOHW"],
        }
        seq += [clip_as_min_max(), relax.transform.ConvertLayout(layouts)]
    if is_cpu and schedule == "ours":
        seq += [decompose_gelu(), relax.transform.FastMathTransform(), divide_by_weights(),
                fold_affine_epilogues(), pad_channels(vector_lanes(target), padded)]  # fmt: skip
    # Constant-only chains (BN statistics are constants after torch.export) are folded here in
    # numpy; FoldConstant would compile each op separately during legalization.
    seq += [fold_constants(), relax.transform.LiftTransformParams()]
    return tvm.transform.Sequential(seq)(mod)


def schedule_cpu(mod, weights: list[np.ndarray], target, report: dict, step, tuning=None):
    """Stage 3: legalize, fuse and schedule with our CPU rules, then pack weights.

    The rules repack weight operands into contiguous panels (``layout_rewrite_preproc`` blocks,
    only for the buffers :func:`mark_weight_buffers` marks as weights);
    ``SplitLayoutRewritePreproc`` moves those blocks into their own PrimFuncs and a second
    ``LiftTransformParams`` lifts them out of ``main``, so the artifact ships packed weights and
    the model pays nothing for the layout at run time.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    passes = cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
    passes.append(mark_weight_buffers())
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    if tuning is not None:  # MetaSchedule: database records replace our rules where faster
        from graphprune.codegen.tuning import tune_and_apply

        mod, tuning["summary"] = tune_and_apply(
            mod, target, tuning["trials"], tuning["dir"], cpu_rules(target), report, step
        )
    passes = [
        schedule_pass(cpu_rules(target), target, report),
        split_layout_rewrite(report),
        relax.transform.LiftTransformParams(),
    ]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    for name in [n for n in report if f"{n}_prepacked" in names]:
        report[f"{name}_prepacked"] = report.pop(name)  # the split keeps the compute half
    if has_lifted_weights(mod):
        step("packing weights")
        # tuning.py records MetaSchedule's packing as "packed_weight": True; our rules record
        # the packed layout as a string.
        ours = tuning is None or not any(r.get("packed_weight") is True for r in report.values())
        mod, weights = evaluate_lifted_weights(mod, weights, ours_only=ours)
    return mod, weights


def mark_weight_buffers():
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


def split_layout_rewrite(report: dict):
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
        mod = optimise(mod, target, schedule, padded)
        if has_lifted_weights(mod):
            step("precomputing transformed weights")
            # numpy where it can (CNNs: layouts, BN folding, padding), else compiled and run
            values = evaluate_in_numpy(mod[TRANSFORM], weights)
            if values is not None:
                mod, weights = without_function(mod, TRANSFORM), values
            else:
                mod, weights = evaluate_lifted_weights(mod, weights)
        if not is_cpu:
            mod = relax.transform.FuseTransposeMatmul()(mod)
    report: dict[str, dict] = {}
    step(f"legalising, fusing, scheduling ({schedule}) and building for {target.kind.name}")
    try:
        pipeline = schedule
        if is_cpu and schedule == "ours":
            mod, weights = schedule_cpu(mod, weights, target, report, step, tuning)
            pipeline = PRESCHEDULED
        exe = tvm.compile(
            mod, target=target, relax_pipeline=relax_pipeline(target, pipeline, report)
        )
    except (ConfigError, CodegenUnsupported):
        raise
    except Exception as e:
        raise CodegenUnsupported(f"TVM failed to build the model for {target}: {e}") from e
    summary = tuning.get("summary") if tuning else None
    return Built(exe, weights, report, summary.to_json() if summary else None, padded)
