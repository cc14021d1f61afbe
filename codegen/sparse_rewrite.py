"""Replace Linear/matmul and conv2d layers whose weight is sparse by ``call_tir`` to our sparse
kernels.

Runs on the lowered Relax module (:mod:`.lower`), *before* :func:`.build.build` (whose
``LiftTransformParams`` would otherwise turn ``permute_dims(W)`` into a new weight and hide the
pattern, and whose ``FuseTransposeMatmul`` changes it). Matches both importers' forms:

* torch ``matmul(x, permute_dims(W))`` (then ``add(bias, ·)``), ONNX Gemm ``matmul(x,
  permute_dims(W))`` (then ``add(·, bias)``): dense weight ``W[N, K]``;
* ONNX MatMul ``matmul(x, W)`` with a 2-D weight ``W[K, N]``: dense weight ``W.T``;
* ``conv2d`` (NCHW, ungrouped; both importers emit the same op): dense weight
  ``W.reshape(N, C·kh·kw)``, activations im2col'd (no copy for a 1×1 conv at batch 1), see
  :mod:`graphprune.codegen.kernels.relax_layers`;

where ``W`` is a weight parameter of ``main`` (index >= ``num_input``) whose value is known. The
bias add is left in place.

**Where the sparsity pattern comes from.** Given ``masks`` (from the IR, checked and applied by
:mod:`.masks`), each layer's pattern is its weight's mask, and a layer whose weight has no mask
stays dense: the graph says which layers are sparse. Without ``masks`` (a plain model), the
pattern is the nonzeros of each weight, as detected here. Either way the compressed arrays hold
the weight's nonzeros, which lie inside its mask. The replacement is ``reshape/permute_dims(x) → call_tir(kernel, XT,
*compressed) → permute_dims/reshape``, or, for a Linear the row-major panel kernels take
(:mod:`graphprune.codegen.kernels.cpu_panel`: AVX-512, sizes multiples of 16, 16+ rows or a
symbolic batch), ``reshape(x) → call_tir(kernel, X, *compressed) → reshape`` with no transposes
(the manifest record's ``layout``: ``"rows"`` or ``"xt"``); compressed arrays become new weight
parameters (shipped in ``weights.npz`` like every other weight), and the dense weight is dropped
when nothing else reads it. Dynamic-shape models: Linears with symbolic leading axes go to the
panel kernels (``auto`` probes them at 128 rows); others stay dense, with the reason.

``kernels="auto"`` measures, per layer shape and batch on the target, the layer alone compiled
dense (our scheduled matmul or conv) and rewritten to each sparse format the weight fits, keeps
the fastest and caches the decision in a JSON file (key: target, conv geometry, shape, batch,
pattern, density). Forced formats fall back to dense, with the reason recorded, for weights they
cannot hold. Every decision, with its timings, goes into the manifest's ``kernels`` table under
``sparse:<weight name>``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from graphprune.codegen.lower import IOSpec, LoweredModel, num_inputs
from graphprune.codegen.kernels import formats
from graphprune.codegen.kernels.cpu_common import simd_lanes
from graphprune.codegen.kernels.dispatch import make_kernel
from graphprune.codegen.kernels.relax_layers import MatrixLayer, match_conv2d, match_linear
from graphprune.ir.errors import CodegenUnsupported, ConfigError

__all__ = ["KERNEL_CHOICES", "Candidate", "compile_probe", "default_cache_path", "detect_block",
           "detect_nm", "rewrite_sparse", "single_linear", "warm_ms"]  # fmt: skip

KERNEL_CHOICES = ("auto", "dense", "csr", "bsr", "nm")
# Above this density no sparse format can win on bytes (CSR int16: 6 bytes per nonzero vs 4).
AUTO_MAX_DENSITY = 0.7
_BLOCKS = [(16, 1), (8, 8), (4, 4), (1, 16), (8, 1), (2, 2)]
_NM = [(1, 4), (2, 8), (2, 4), (4, 8)]
# Part of every ``auto`` cache key: a change of the kernels (or of how a layer is called) bumps
# it, so decisions measured with the old kernels are not reused
KERNELS_REVISION = "rows2"


def default_cache_path() -> Path:
    """``$GRAPHPRUNE_KERNEL_CACHE`` or ``~/.cache/graphprune/sparse_kernels.json``."""
    env = os.environ.get("GRAPHPRUNE_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "graphprune" / "sparse_kernels.json"


def detect_block(w: np.ndarray, min_fill: float = 0.95):
    """The largest ``(R, C)`` block whose nonzero blocks are at least ``min_fill`` full, or None.

    Examples
    --------
    >>> detect_block(np.kron(np.eye(4), np.ones((4, 4))))
    (4, 4)
    """
    nnz = int(np.count_nonzero(w))
    if nnz == 0:
        return None
    for block in sorted(_BLOCKS, key=lambda b: -b[0] * b[1]):
        b = formats.compress_bsr(w, block)
        if nnz >= min_fill * b.nnzb * block[0] * block[1]:
            return block
    return None


def detect_nm(w: np.ndarray):
    """The sparsest listed ``(N, M)`` pattern that ``w`` fits, or None.

    Examples
    --------
    >>> detect_nm(np.array([[1.0, 0, 2.0, 0, 0, 0, 0, 3.0]]))
    (2, 4)
    """
    fits = [p for p in _NM if w.shape[1] >= p[1] and formats.nm_fits(w, *p)]
    return min(fits, key=lambda p: p[0] / p[1]) if fits else None


@dataclass(frozen=True)
class Candidate:
    """One sparse format (and its options) a layer is rewritten to."""

    fmt: str
    options: dict

    def kernel(self, w, batch, lanes, rows: bool = False):
        return make_kernel(w, self.fmt, batch, lanes=lanes, rows=rows, **self.options)


def _candidates(w: np.ndarray, kernels: str) -> tuple[list[Candidate], str]:
    """Sparse candidates for a weight whose sparsity pattern is the nonzeros of ``w`` (the
    weight, or its mask) under ``kernels``, or ``([], reason)``."""
    density = np.count_nonzero(w) / max(w.size, 1)
    block, nm = detect_block(w), detect_nm(w)
    if kernels == "csr":
        return [Candidate("csr", {})], ""
    if kernels == "bsr":
        return [Candidate("bsr", {"block": block or (4, 4)})], ""
    if kernels == "nm":
        if nm is None:
            return [], "weight is not N:M sparse (a group has too many nonzeros)"
        return [Candidate("nm", {"nm": nm})], ""
    if density > AUTO_MAX_DENSITY:
        return [], f"density {density:.2f} > {AUTO_MAX_DENSITY}: no sparse format can win"
    cands = [Candidate("csr", {})]
    if block is not None and block != (1, 1):
        cands.append(Candidate("bsr", {"block": block}))
    if nm is not None:
        cands.append(Candidate("nm", {"nm": nm}))
    return cands, ""


class _DecisionCache:
    """JSON file of ``key -> {"choice", "options", "times_ms"}``, rewritten atomically."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data = {}
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.data = {}  # a corrupt cache is only a lost measurement

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def single_linear(w: np.ndarray, batch: int) -> LoweredModel:
    """``main(x[B,K], W[N,K]) = x @ W.T`` as the torch importer writes it."""
    from tvm import relax

    n, k = w.shape
    x = relax.Var("x", relax.TensorType((batch, k), "float32"))
    wv = relax.Var("w", relax.TensorType((n, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, wv], attrs={"num_input": 1}):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(wv, [1, 0]))
            out = bb.emit_output(relax.op.matmul(x, wt))
        bb.emit_func_output(out)
    return LoweredModel(bb.get(), [w], [IOSpec("x", (batch, k), "float32")],
                        [IOSpec("y", (batch, n), "float32")], "probe")  # fmt: skip


def compile_probe(lowered: LoweredModel, cand: Candidate | None, target, lanes: int):
    """``(vm, args)``: a one-layer model built through the full pipeline (dense, or rewritten
    to ``cand``) and the arguments of one call of its ``main`` (a fixed random input, then the
    weights)."""
    import tvm
    from tvm import relax

    from graphprune.codegen.build import build

    if cand is not None:
        lowered, _ = _rewrite(lowered, lambda _n, _layer: (cand, {}), lanes)
    built = build(lowered, target)
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(lowered.inputs[0].shape).astype(np.float32)
    return vm, [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(a) for a in built.weights]


def _time_probes(lowered: LoweredModel, cands: dict[str, Candidate | None], target, lanes: int,
                 rounds: int = 3) -> dict[str, float]:  # fmt: skip
    """Milliseconds of a one-layer model through the full pipeline, dense (``None``) or
    rewritten to each candidate: transposes, im2col, VM call overhead and all, so the comparison
    is what the artifact will run. Repeated calls: the weights stay cache-resident where they
    fit. The probes are timed in interleaved rounds, best of each kept, so a burst of load on a
    shared machine hits every candidate rather than deciding the choice."""
    probes = {name: compile_probe(lowered, cand, target, lanes) for name, cand in cands.items()}
    times = {name: float("inf") for name in probes}
    for _ in range(rounds):
        for name, (vm, args) in probes.items():
            times[name] = min(times[name], warm_ms(vm, args, repeat=1))
    return times


def warm_ms(vm, args, repeat: int = 3) -> float:
    """``auto``'s measurement of a compiled probe: the best of ``repeat`` means of back-to-back
    calls of ``main`` (at least 5 calls and 20 ms each), in milliseconds."""
    import tvm

    ev = vm.time_evaluator("main", tvm.cpu(), number=5, repeat=repeat, min_repeat_ms=20)
    return 1e3 * float(min(ev(*args).results))


def _decide(layer: MatrixLayer, kernels, target, cache: _DecisionCache, lanes):
    """``(candidate or None, manifest record)`` for one matched layer; its sparsity pattern is
    :meth:`MatrixLayer.pattern` (the mask from the IR where known)."""
    w, batch = layer.pattern(), layer.batch
    density = float(np.count_nonzero(w) / max(w.size, 1))
    record = {"shape": list(w.shape), "batch": batch, "density": round(density, 4)}
    if layer.dynamic:
        record["batch"] = f"dynamic (auto probes {batch} rows)"
    if layer.signature:
        record["layer"] = layer.signature
    cands, reason = _candidates(w, kernels)
    if layer.dynamic and kernels == "auto":  # only the panel kernels take a symbolic batch
        cands = [c for c in cands if c.fmt in ("csr", "nm")]
    if not cands:
        return None, {**record, "sparsity": "dense", "reason": reason}
    if kernels != "auto":
        return cands[0], {**record, "sparsity": kernels, "options": _jsonable(cands[0].options)}
    pattern = ",".join(f"{c.fmt}:{_jsonable(c.options)}" for c in cands)
    sig = f"{layer.signature}|" if layer.signature else ""
    shape = f"{w.shape[0]}x{w.shape[1]}"
    rows = f"{batch}dyn" if layer.dynamic else batch
    key = f"{target}|{KERNELS_REVISION}|{sig}{shape}|b{rows}|{pattern}|d{density:.2f}"
    hit = cache.get(key)
    if hit is None:
        probe = layer.probe()
        times = _time_probes(probe, {"dense": None, **{c.fmt: c for c in cands}}, target, lanes)
        best = min(times, key=times.get)
        hit = {"choice": best, "times_ms": {f: round(t, 4) for f, t in times.items()}}
        cache.put(key, hit)
    chosen = next((c for c in cands if c.fmt == hit["choice"]), None)
    rec = {**record, "sparsity": hit["choice"], "times_ms": hit["times_ms"], "cache_key": key}
    if chosen is not None:
        rec["options"] = _jsonable(chosen.options)
    return chosen, rec


def _jsonable(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _rewrite(lowered: LoweredModel, decide, lanes: int, masks: dict | None = None):
    """Apply ``decide(name, MatrixLayer) -> (candidate or None, record)`` to every matched
    Linear and conv of ``lowered``; return the new LoweredModel and ``{weight name: record}``.
    ``masks``: ``{name in lowered.param_names: mask}``, handed to the layers' matchers."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    mod = lowered.mod
    main = mod["main"]
    num_input = num_inputs(main)
    weight_vars = main.params[num_input:]
    weight_of = {p: v for p, v in zip(weight_vars, lowered.params)}
    mask_of = {p: masks[n] for p, n in zip(weight_vars, lowered.param_names) if n in (masks or {})}
    new_params: list = []
    new_values: list[np.ndarray] = []
    records: dict[str, dict] = {}

    @mutator
    class _Mutator(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.matmul":
                layer = match_linear(call, *call.args, weight_of, self.lookup_binding, mask_of)
            elif call.op.name == "relax.nn.conv2d":
                layer = match_conv2d(call, weight_of, mask_of)
            else:
                return call
            if layer is None:
                return call
            name = layer.weight.name
            cand, record = decide(name, layer)
            records[name] = record
            if cand is None:
                return call
            batch = None if layer.dynamic else layer.batch
            try:
                kern = cand.kernel(layer.dense, batch, lanes, rows=layer.to_rows is not None)
            except CodegenUnsupported as e:
                record.update(sparsity="dense", reason=str(e))
                return call
            n, k = layer.dense.shape
            kind = "conv" if layer.signature else ""
            fname = f"sparse_{kern.fmt}{kind}_{n}x{k}_b{batch or 'dyn'}"
            gv = self.builder_.add_func(kern.func.with_attr("global_symbol", fname), fname)
            vars_ = []
            for i, arr in enumerate(kern.weights):
                v = relax.Var(f"{name}_{kern.fmt}{i}", relax.TensorType(arr.shape, str(arr.dtype)))
                new_params.append(v)
                new_values.append(arr)
                vars_.append(v)
            emit = self.builder_.emit
            record["layout"] = kern.layout
            if kern.layout == "rows":
                x2 = layer.to_rows(emit)
                out_ty = relax.TensorType((x2.ty.shape.values[0], n), "float32")
                y = emit(relax.call_tir(gv, [x2, *vars_], out_ty=out_ty))
                return layer.from_rows(emit, y)
            xt = layer.to_xt(emit)
            out_ty = relax.TensorType((n, layer.batch), "float32")
            yt = emit(relax.call_tir(gv, [xt, *vars_], out_ty=out_ty))
            return layer.from_yt(emit, yt)

    m = _Mutator(mod)
    new_main = m.visit_expr(main)
    if not new_params:
        return lowered, records
    func = relax.Function(list(new_main.params) + new_params, new_main.body, new_main.ret_ty,
                          new_main.is_pure, new_main.attrs)  # fmt: skip
    func = relax.analysis.remove_all_unused(func)
    used = set(relax.analysis.free_vars(func.body))
    old_names = lowered.param_names or [""] * len(lowered.params)  # probes have none
    names = old_names + [v.name for v in new_params]  # a new array: its var's name
    keep = [(p, v, name) for p, v, name in zip(func.params[num_input:],
            lowered.params + new_values, names) if p in used]  # fmt: skip
    func = relax.Function(list(func.params[:num_input]) + [p for p, _, _ in keep], func.body,
                          func.ret_ty, func.is_pure, func.attrs)  # fmt: skip
    out_mod = m.builder_.get()
    out_mod[out_mod.get_global_var("main")] = func
    new = replace(lowered, mod=out_mod, params=[v for _, v, _ in keep],
                  param_names=[n for _, _, n in keep] if lowered.param_names else [])  # fmt: skip
    return new, records


def rewrite_sparse(lowered: LoweredModel, target, kernels: str = "auto",
                   cache_path=None, progress=None, masks: dict | None = None):  # fmt: skip
    """Rewrite the sparse Linears and convs of ``lowered`` to sparse kernels for ``target``.

    Parameters
    ----------
    lowered : LoweredModel
        From :func:`graphprune.codegen.lower.lower` (weights as parameters, values known).
    target : tvm.target.Target
        Only ``llvm`` targets are rewritten (the CUDA 2:4 kernel is standalone, see
        :mod:`graphprune.codegen.experimental.cuda_sparse24`).
    kernels : {"auto", "dense", "csr", "bsr", "nm"}
    cache_path : path, optional
        The ``auto`` decision cache (default :func:`default_cache_path`); ``False`` for none.
    progress : callable(str), optional
    masks : dict of str to bool ndarray, optional
        Sparsity masks from the IR, keyed by ``lowered.param_names`` and already checked and
        applied (:func:`graphprune.codegen.masks.apply_masks`): each layer's pattern is its
        mask, and layers whose weight has none stay dense. ``None``: detect from the zeros.

    Returns
    -------
    (LoweredModel, dict)
        The rewritten model and ``{"sparse:<weight>": record}`` for the manifest.

    Examples
    --------
    >>> new, records = rewrite_sparse(lowered, make_target("llvm"), "csr")  # doctest: +SKIP
    >>> records["sparse:p_0_weight"]["sparsity"]                            # doctest: +SKIP
    'csr'
    """
    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"kernels must be one of {KERNEL_CHOICES}, not {kernels!r}")
    if kernels == "dense" or target.kind.name != "llvm":
        return lowered, {}
    step = progress or (lambda msg: None)
    if cache_path is False:
        cache = _DecisionCache(None)
    else:
        cache = _DecisionCache(Path(cache_path) if cache_path else default_cache_path())
    lanes = simd_lanes(target)

    def decide(name, layer: MatrixLayer):
        if masks is not None and layer.keep is None:
            record = {"shape": list(layer.dense.shape), "batch": layer.batch, "sparsity": "dense",
                      "reason": "the graph has no sparsity mask for this weight"}  # fmt: skip
            return None, {**record, "layer": layer.signature} if layer.signature else record
        w = layer.pattern()
        if kernels == "auto" and np.count_nonzero(w) / max(w.size, 1) <= AUTO_MAX_DENSITY:
            step(f"measuring kernels for {name} {w.shape} batch {layer.batch}")
        return _decide(layer, kernels, target, cache, lanes)

    new, records = _rewrite(lowered, decide, lanes, masks)
    return new, {f"sparse:{k}": v for k, v in records.items()}
