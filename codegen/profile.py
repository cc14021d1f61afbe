"""Per-kernel profile of a compiled artifact: each PrimFunc's time on the shapes the model calls it
with, so a slow model can be traced to the kernel that makes it slow.

The Relax VM of TVM 0.27 (PyPI) has no ``profile()``: ``vm.builtin.profile`` is not registered
and the profiling VM needs an executable built for it. Instead :func:`profile_artifact` runs the
model once with a VM instrument (``VirtualMachine.set_instrument``) that, *after* each call of a
compiled kernel, times that same call again with ``time_evaluator`` on the very arguments it just
ran with: the inputs are unchanged at that point and the output is rewritten with the same
values. Each distinct (kernel, argument shapes) is timed once; a kernel called N times (the
layers of a transformer share kernels) counts N times its per-call time. VM builtins (allocation,
shape checks) are counted, not timed; what the model's wall time has beyond the kernels' sum is
VM overhead and argument passing.

Runs on a loaded artifact (``graphprune.runtime.load``); it opens its own VM, so the artifact's
lock and buffers are not touched. Do not use the outputs of the profiled call (a kernel that
writes in place would have run more than once).

Examples
--------
>>> from graphprune.codegen.profile import profile_artifact        # doctest: +SKIP
>>> prof = profile_artifact("build/resnet", [x])                     # doctest: +SKIP
>>> print(prof.to_text(top=10))                                      # doctest: +SKIP
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphprune.ir.errors import ArtifactError

__all__ = ["KernelProfile", "KernelTime", "category", "profile_artifact"]

# First match wins. A name is split into lower-case words (``fused_conv2d_add`` -> fused, conv,
# d, add; ``FusedConv`` -> fusedconv); a word matches a key it starts or ends with. Ours, ONNX
# Runtime's and OpenVINO's op names share these keys, so per-category totals compare across the
# three. Arithmetic comes before data movement: ``fused_reshape_add`` is an add that TVM fused
# with a reshape, not a copy.
_CATEGORIES = [
    ("conv", ("conv", "groupconv")),
    ("gemm", ("matmul", "gemm", "dense", "fullyconnected", "linear", "sparse", "csr", "bsr")),
    ("attention", ("attention", "sdpa")),
    ("softmax", ("softmax",)),
    ("norm", ("norm", "layernorm", "skiplayernorm", "mvn")),
    ("pool/reduce", ("pool", "reduce", "mean", "sum")),
    ("elementwise", ("add", "multiply", "mul", "subtract", "sub", "divide", "div", "erf", "gelu",
                     "tanh", "relu", "sigmoid", "exp", "clip", "maximum", "minimum", "where",
                     "power", "sqrt", "eltwise", "subgraph")),
    ("data movement", ("transpose", "permute", "reshape", "concat", "split", "slice", "gather",
                       "take", "reorder", "copy", "layout", "squeeze", "expand", "pad",
                       "flatten", "broadcast")),
]  # fmt: skip


def category(name: str) -> str:
    """A coarse op category (``conv``, ``gemm``, ``attention``, ``softmax``, ``norm``,
    ``pool/reduce``, ``elementwise``, ``data movement``) from a kernel or op type name.

    >>> category("fused_conv2d_add_relu3"), category("FullyConnected"), category("Add")
    ('conv', 'gemm', 'elementwise')
    >>> category("fused_reshape1_add_add"), category("Transpose")
    ('elementwise', 'data movement')
    """
    words = re.findall(r"[a-z]+", name.lower())
    for cat, keys in _CATEGORIES:
        if any(w.startswith(k) or w.endswith(k) for w in words for k in keys):
            return cat
    return "elementwise"


@dataclass(frozen=True)
class KernelTime:
    """One kernel on one set of argument shapes: ``ms`` per call (median), ``best_ms`` (the
    fastest call: on cores shared with other jobs, the uncontended time), ``calls`` per model
    run. ``order`` is its first call's position in the run; ``out_elems`` the element count of
    its last argument (a ``call_tir`` kernel's output)."""

    name: str
    calls: int
    ms: float
    shapes: tuple[tuple[int, ...], ...]
    order: int
    out_elems: int
    best_ms: float = float("nan")

    @property
    def total_ms(self) -> float:
        return self.calls * self.ms

    @property
    def category(self) -> str:
        return category(self.name)


@dataclass
class KernelProfile:
    """Kernels sorted by total time (largest first), the model's wall time per call, the
    number of VM builtin calls per run, and ``sequence``: every kernel call of one run in
    order, as an index into ``kernels`` (to line calls up with another runtime's layers)."""

    kernels: list[KernelTime]
    wall_ms: float
    builtin_calls: int
    sequence: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kernel_ms(self) -> float:
        return sum(k.total_ms for k in self.kernels)

    def by_category(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.kernels:
            out[k.category] = out.get(k.category, 0.0) + k.total_ms
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_text(self, top: int = 15) -> str:
        head = (f"wall {self.wall_ms:.3f} ms per call, kernels {self.kernel_ms:.3f} ms "
                f"({len(self.kernels)} distinct), VM builtins {self.builtin_calls} calls")
        lines = [head, f"{'kernel':60s} {'calls':>5s} {'ms/call':>9s} {'total ms':>9s} {'%':>5s}"]
        for k in self.kernels[:top]:
            share = 100 * k.total_ms / self.kernel_ms if self.kernel_ms else 0.0
            lines.append(f"{k.name[:60]:60s} {k.calls:5d} {k.ms:9.4f} {k.total_ms:9.3f} "
                         f"{share:5.1f}")  # fmt: skip
        return "\n".join(lines)


def _kernel_module(lib, name: str):
    """The runtime module (the library or one of its imports) that defines kernel ``name``."""
    stack = [lib]
    while stack:
        mod = stack.pop()
        if mod.implements_function(name):
            return mod
        stack.extend(mod.imports)
    return None


def profile_artifact(artifact, inputs, number: int = 1, repeat: int = 20,
                     wall_repeat: int = 10) -> KernelProfile:  # fmt: skip
    """Time every kernel of ``artifact`` on the shapes ``inputs`` make it run with.

    Parameters
    ----------
    artifact : graphprune.runtime.Artifact, str or os.PathLike
        A loaded artifact or its directory (CPU targets).
    inputs : sequence of arrays or tensors
        One call's inputs (the shapes the artifact was compiled for).
    number, repeat : int
        ``time_evaluator``'s: each kernel runs ``number`` times per measurement, ``repeat``
        measurements, the median is kept. The default (single calls, median of 20) matches how
        the peers' profilers report a layer (one call each run), and keeps a preemption on
        shared cores out of the figure instead of averaging it in.
    wall_repeat : int
        Uninstrumented whole-model calls for ``wall_ms`` (median).

    Returns
    -------
    KernelProfile
    """
    import tvm
    from tvm import relax

    from graphprune.runtime import Artifact, load

    art = artifact if isinstance(artifact, Artifact) else load(Path(artifact))
    if art.manifest.get("target", {}).get("kind", "llvm") != "llvm":
        raise ArtifactError(f"{art.path}: profile_artifact times CPU artifacts only")
    dev = tvm.cpu(0)
    lib = tvm.runtime.load_module(str(art.path / art.manifest["library"]))
    vm = relax.VirtualMachine(lib, dev)
    with np.load(art.path / art.manifest["weights"], allow_pickle=False) as w:
        weights = [tvm.runtime.tensor(w[n], dev) for n in art.manifest["weight_names"]]
    arrays = [np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
              for x in inputs]  # fmt: skip
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    main = vm[art.manifest.get("entry", "main")]
    for _ in range(2):
        main(*args, *weights)
    walls = []
    for _ in range(wall_repeat):
        t = time.perf_counter()
        main(*args, *weights)
        walls.append(time.perf_counter() - t)

    timed: dict[tuple, dict] = {}
    order: list[tuple] = []
    builtins = 0
    failures: list[str] = []

    def instrument(func, symbol, before_run, ret_value, *call_args):
        nonlocal builtins
        if before_run:
            return 0
        if symbol.startswith("vm."):
            builtins += 1
            return 0
        shapes = tuple(tuple(int(d) for d in a.shape) for a in call_args if hasattr(a, "shape"))
        key = (symbol, shapes)
        order.append(key)
        if key in timed:
            timed[key]["calls"] += 1
            return 0
        entry = {"calls": 1, "order": len(timed), "ms": float("nan"), "best": float("nan")}
        timed[key] = entry
        mod = _kernel_module(lib, symbol)
        if mod is None:
            failures.append(f"{symbol}: not found in the library")
            return 0
        try:
            evaluator = mod.time_evaluator(symbol, dev, number=number, repeat=repeat)
            res = evaluator(*call_args)
            entry["ms"], entry["best"] = float(res.median * 1e3), float(min(res.results) * 1e3)
        except Exception as e:  # noqa: BLE001 - an untimeable kernel is reported, not fatal
            failures.append(f"{symbol}: {type(e).__name__}: {e}")
        return 0

    vm.set_instrument(instrument)  # this VM is ours and dropped on return: no need to unset
    main(*args, *weights)
    kernels = [
        KernelTime(name, e["calls"], e["ms"], shapes, e["order"],
                   int(np.prod(shapes[-1])) if shapes else 0, e["best"])
        for (name, shapes), e in timed.items()
    ]  # fmt: skip
    kernels.sort(key=lambda k: -(k.total_ms if k.ms == k.ms else -1.0))
    index = {(k.name, k.shapes): i for i, k in enumerate(kernels)}
    return KernelProfile(kernels, float(np.median(walls) * 1e3), builtins,
                         [index[key] for key in order], failures)  # fmt: skip
