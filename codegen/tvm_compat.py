"""The one place codegen reaches into TVM's private or internal APIs (apache-tvm 0.27.0).

Each wrapper says what it uses, why no public API does the job, and what to check when TVM is
upgraded. Nothing else under ``codegen/`` may use a ``tvm.*._name`` or patch TVM's modules:
``tests/codegen/test_tvm_compat.py`` checks that.
"""

from __future__ import annotations

__all__ = ["import_cpu_tensor_intrinsics", "workload_module"]


def workload_module(func):
    """The ``IRModule`` MetaSchedule keys a PrimFunc's database records by.

    Uses ``tvm.s_tir.meta_schedule.tune_context._normalize_mod`` (private in 0.27.0): the
    database's workload is the structural hash of *this* normalisation (``global_symbol`` and
    ``tirx.noalias`` set, the function renamed ``main``), and a copy of it would stop matching
    the records as soon as TVM changed it. On upgrade: check that ``JSONDatabase.has_workload``
    still finds the records ``tune_tasks`` wrote (``tests/codegen/test_codegen_tuning.py``).
    """
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def import_cpu_tensor_intrinsics() -> None:
    """Register only the CPU tensor intrinsics MetaSchedule's CPU rules may ask for.

    ``TuneContext()`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` (0.27.0) parses
    the TVMScript of every intrinsic (CUDA, ROCm, Hexagon, ...): 30 s of CPU, two minutes on a
    loaded 2-core machine, for a search that then takes seconds. No option skips that, so we
    put the package in ``sys.modules`` without running its ``__init__`` (submodules still import
    normally, on demand) and import the one for this CPU (0.4 s). A no-op where the package is
    already imported. On upgrade: check that ``tensor_intrin/x86.py`` (``arm_cpu.py``) still
    registers the intrinsics by itself, without the package ``__init__``.
    """
    import importlib
    import importlib.util
    import platform
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__, pkg.__package__ = spec, name
    sys.modules[name] = pkg
    arm = platform.machine().lower() in ("aarch64", "arm64")
    importlib.import_module(f"{name}.{'arm_cpu' if arm else 'x86'}")
