"""MetaSchedule tuning for ``compile(tune=True, trials=N)``, with a database kept on disk.

Runs inside :func:`graphprune.codegen.build.schedule_cpu`, after legalize/fuse and the
marking of weight buffers, before our rules; the PrimFuncs it schedules are marked
``tirx.is_scheduled`` so the rules skip them. Per kernel (one distinct PrimFunc):

1. **Ours, timed.** Our rules' schedule is built and timed the way MetaSchedule times its
   candidates; the time is kept beside the database (``graphprune_rules.json``).
2. **Tune** the kernels the database does not know yet, ``trials`` measured candidates in all
   (``ms.tune_tasks``). A kernel it knows is not tuned again: a second compile with the same
   database runs no trials (that is what the database is for).
3. **Apply** a kernel's best record only where it is faster than ours; our rules schedule the
   rest. Tuning therefore never makes a kernel slower than untuned, as measured; with a handful
   of trials it usually keeps ours.

The database is MetaSchedule's ``JSONDatabase`` (two JSON-lines files) in ``tuning_dir``:
default ``$GRAPHPRUNE_TUNING_DIR`` or ``~/.cache/graphprune/tuning``. Records are keyed by the
structural hash of the PrimFunc and by target, so one directory serves many models.

Static shapes only: ``compile(tune=True, dynamic_shapes=...)`` is refused (``ConfigError``, in
:func:`graphprune.codegen.compiler.compile`). MetaSchedule measures every candidate on random
inputs of the kernel's exact shapes (``ms.arg_info.ArgInfo.from_entry_func`` needs integer
extents and raises ``TypeError`` on a symbolic one), so a kernel with a symbolic batch or
sequence cannot be measured at all; tuning a dynamic artifact would need one kernel per shape
bucket and a dispatch on the dims, which the artifact does not have.

Needs ``apache-tvm-ffi`` other than 0.1.15.*: with it every ``tvm.ir.save_json`` (which the
database uses for workloads) segfaults (shared/TVM_NOTES.md); we refuse with a ``ConfigError``
rather than crash. ``xgboost`` is used for the cost model when installed, else a random model
(MetaSchedule's ``"random"``: the search ranks its candidates at random instead of by a model
fitted to the measurements); the manifest's ``tuning.cost_model`` says which one this compile's search used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from graphprune.codegen.tvm_compat import import_cpu_tensor_intrinsics, workload_module

from graphprune.ir.errors import CodegenUnsupported, ConfigError

__all__ = ["TuningReport", "default_tuning_dir", "tune_and_apply"]

_BROKEN_FFI = ("0.1.15",)  # tvm.ir.save_json segfaults with these apache-tvm-ffi releases


def default_tuning_dir() -> Path:
    """``$GRAPHPRUNE_TUNING_DIR`` or ``~/.cache/graphprune/tuning``."""
    env = os.environ.get("GRAPHPRUNE_TUNING_DIR")
    return Path(env) if env else Path.home() / ".cache" / "graphprune" / "tuning"


@dataclass
class TuningReport:
    """What tuning did, for the manifest."""

    database: str
    trials: int
    tasks: int = 0
    reused_tasks: int = 0
    new_records: int = 0
    kept_ours: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    # MetaSchedule's cost model for this compile's search: "xgb" or "random" (xgboost missing);
    # None when no search ran (every kernel was already in the database, or trials == 0).
    cost_model: str | None = None

    def to_json(self) -> dict:
        return {
            "database": self.database, "trials_requested": self.trials, "tasks": self.tasks,
            "reused_tasks": self.reused_tasks, "new_records": self.new_records,
            "cost_model": self.cost_model,
            "kept_our_schedule": sorted(self.kept_ours), "metaschedule": sorted(self.tuned),
        }  # fmt: skip


def cost_model_name() -> str:
    """The cost model MetaSchedule is given: ``"xgb"`` where ``xgboost`` imports, else
    ``"random"`` (MetaSchedule's fallback: candidates are ranked at random, not by a model fitted
    to the measurements)."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def check_tuning_available() -> None:
    """Raise ``ConfigError`` where MetaSchedule's database would crash the process."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ffi = version("apache-tvm-ffi")
    except PackageNotFoundError:
        return
    if ffi.startswith(_BROKEN_FFI):
        raise ConfigError(
            f"tune=True needs apache-tvm-ffi other than {ffi}: with it tvm.ir.save_json, which "
            f"MetaSchedule's database uses, segfaults. Install the release TVM 0.27 was built "
            f"against: pip install 'apache-tvm-ffi==0.1.14.post0'"
        )


def _in_process_builder():
    """A MetaSchedule builder that compiles in this process.

    ``LocalBuilder`` starts fresh worker processes for every batch, and each imports
    ``tvm.s_tir.tensor_intrin`` (parses every tensor intrinsic's TVMScript: 20-40 s of CPU
    here), so a handful of trials took minutes and timed out under load. Our CPU candidates
    need no tensor intrinsics; what the default build does besides is the removal of the
    layout-rewrite blocks, done here too. Runs still go to ``LocalRunner``'s worker.
    """
    from tvm.driver import build as tvm_build
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    path = default_export(tvm_build(mod, target=item.target))
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as e:  # noqa: BLE001 - a candidate that does not build is a failed trial
                    results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def _in_process_runner():
    """A MetaSchedule runner that times candidates in this process, with ``LocalRunner``'s
    argument filling and evaluator. Its worker process took a minute to start under load (it
    imports TVM and pickles the evaluator), longer than the handful of trials it then ran."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig
    from tvm.s_tir.meta_schedule.runner.local_runner import (
        LocalRunnerFuture,
        default_alloc_argument,
        default_run_evaluator,
    )

    @derived_object
    class InProcessRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            config = EvaluatorConfig()  # LocalRunner's default evaluator
            futures = []
            for item in runner_inputs:
                try:
                    rt_mod = tvm.runtime.load_module(str(item.artifact_path))
                    dev = tvm.runtime.device(str(item.device_type), 0)
                    args = default_alloc_argument(
                        dev, tuple(a.as_json() for a in item.args_info), 1
                    )
                    costs = default_run_evaluator(rt_mod, dev, config, args)
                    futures.append(LocalRunnerFuture(res=costs))
                except Exception as e:  # noqa: BLE001 - a candidate that fails to run is a failed trial
                    futures.append(LocalRunnerFuture(error_message=f"{type(e).__name__}: {e}"))
            return futures

    return InProcessRunner()


def _measure(mods, target) -> list[list[float] | None]:
    """Build and time ``mods`` like MetaSchedule measures its candidates (same numbers)."""
    from tvm.s_tir import meta_schedule as ms

    builder, runner = _in_process_builder(), _in_process_runner()
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, where = [], []
    for i, (b, m) in enumerate(zip(built, mods)):
        if b.error_msg is None:
            args = ms.arg_info.ArgInfo.from_entry_func(m, remove_preproc=True)
            inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", args))
            where.append(i)
    out: list[list[float] | None] = [None] * len(mods)
    for i, future in zip(where, runner.run(inputs)):
        res = future.result()
        if res.error_msg is None:
            out[i] = [float(s) for s in res.run_secs]
    return out


OURS_FILE = "graphprune_rules.json"  # our rules' measured time per workload, beside the database


def _key(task_mod, target) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(task_mod) & (2**64 - 1):016x}/{target}"


def _load_ours(work_dir: Path) -> dict:
    try:
        return json.loads((work_dir / OURS_FILE).read_text())
    except (OSError, ValueError):
        return {}  # a lost measurement is re-measured


def _measure_rules(tasks, rules, target) -> dict[str, float]:
    """Our rules' schedule of each task, timed like MetaSchedule times its candidates.

    Kept beside the database, not in it: the evolutionary search starts from the database's
    records, and replaying our traces there fails a check in TVM 0.27's search
    (``args.size() == initial_indices_orig.size()``, the varargs index map of our packing)."""
    scheduled = []
    for task in tasks:
        mod = task.dispatched[0]
        for rule in rules:
            sch = rule.apply(mod["main"], target, False)
            if sch is not None:
                scheduled.append((task, sch[0] if isinstance(sch, list) else sch))
                break
    times = _measure([sch.mod for _, sch in scheduled], target)
    return {
        _key(task.dispatched[0], target): min(secs)
        for (task, _), secs in zip(scheduled, times) if secs
    }  # fmt: skip


def tune_and_apply(mod, target, trials: int, tuning_dir, rules, report: dict, step):
    """Tune ``mod``'s PrimFuncs (see the module docstring) and apply the database where its
    record beats our rules. ``report`` gets an entry per PrimFunc the database scheduled;
    returns the module and a :class:`TuningReport`."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    check_tuning_available()
    if trials < 0:
        raise ConfigError(f"trials must be >= 0, not {trials}")
    work_dir = Path(tuning_dir) if tuning_dir is not None else default_tuning_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    summary = TuningReport(str(work_dir), trials)
    try:
        db = ms.database.JSONDatabase(work_dir=str(work_dir))
        n_before = len(db)
        tasks = [
            t for t in ms.relax_integration.extract_tasks(mod, target)
            if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)
        ]  # fmt: skip
        summary.tasks = len(tasks)
        ours = _load_ours(work_dir)
        new = [t for t in tasks if not db.has_workload(t.dispatched[0])]
        summary.reused_tasks = len(tasks) - len(new)
        missing = [t for t in tasks if _key(t.dispatched[0], target) not in ours]
        if missing:
            step(f"tuning: timing our schedules of {len(missing)} kernel(s)")
            ours.update(_measure_rules(missing, rules, target))
            tmp = work_dir / f".{OURS_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(ours, indent=1, sort_keys=True))
            os.replace(tmp, work_dir / OURS_FILE)
        if new and trials > 0:
            step(f"tuning {len(new)} kernel(s) with MetaSchedule, {trials} trials")
            per_task = max(1, -(-trials // len(new)))
            import_cpu_tensor_intrinsics()  # before any TuneContext is made
            # The default population (512 schedules sampled per round) costs ~20 s a kernel on
            # a loaded 2-core machine; a search of a few dozen trials needs far fewer.
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=min(512, max(32, 8 * per_task)),
                init_min_unmeasured=min(50, max(8, 2 * per_task)),
                genetic_num_iters=2 if per_task < 64 else 4,
            )
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                new, work_dir=str(work_dir / "logs"), strategy=strategy, seed=0
            )
            cost_model = summary.cost_model = cost_model_name()
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(work_dir / "logs"),
                max_trials_global=trials, max_trials_per_task=per_task,
                num_trials_per_iter=min(64, per_task), database=db, cost_model=cost_model,
                builder=_in_process_builder(), runner=_in_process_runner(),
            )  # fmt: skip
        summary.new_records = len(db) - n_before
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            key_mod = workload_module(func)
            if not db.has_workload(key_mod):
                continue
            best = db.query_tuning_record(key_mod, target, "main")
            secs = [float(x) for x in best.run_secs] if best is not None and best.run_secs else []
            mine = ours.get(_key(key_mod, target))
            if not secs or (mine is not None and mine <= min(secs)):
                summary.kept_ours.append(gv.name_hint)
                continue  # our rules schedule it (next pass)
            sch = db.query_schedule(key_mod, target, "main")
            tuned = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if "global_symbol" in func.attrs:  # the query module renamed it "main"
                tuned = tuned.with_attr("global_symbol", func.attrs["global_symbol"])
            else:
                tuned = tuned.without_attr("global_symbol")
            updates[gv] = tuned
            summary.tuned.append(gv.name_hint)
            report[gv.name_hint] = {
                "rule": "MetaSchedule", "sparsity": "dense",
                "tuned_us": round(1e6 * min(secs), 3),
                "ours_us": round(1e6 * mine, 3) if mine is not None else None,
            }  # fmt: skip
        for gv, func in updates.items():
            mod[gv] = func
        for gv in updates:
            if _has_preproc(mod, gv.name_hint):
                report[gv.name_hint]["packed_weight"] = True
    except (ConfigError, CodegenUnsupported):
        raise
    except Exception as e:
        raise CodegenUnsupported(f"MetaSchedule tuning failed (database {work_dir}): {e}") from e
    return mod, summary


def _has_preproc(mod, name: str) -> bool:
    """The function carries a root-level ``layout_rewrite_preproc`` block (a packed weight, the
    kind ``SplitLayoutRewritePreproc`` splits off)."""
    from tvm import s_tir, tirx

    funcs = [f for gv, f in mod.functions_items() if gv.name_hint == name]
    if not funcs or not isinstance(funcs[0], tirx.PrimFunc):
        return False
    try:
        sch = s_tir.Schedule(funcs[0])
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no root block: nothing to split
        return False
    key = "meta_schedule.layout_rewrite_preproc"
    return any(key in (sch.get(b).annotations or {}) for b in blocks)
