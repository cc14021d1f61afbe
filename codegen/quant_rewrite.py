"""Replace the quantized Linear layers of a lowered model by our INT8 kernels.

Runs in :func:`graphprune.codegen.compiler.compile` after :mod:`.lower` (and :mod:`.masks`) and
*before* :mod:`.sparse_rewrite` and :func:`.build.build`, when ``compile`` is given a graph whose
:attr:`~graphprune.ir.PruneGraph.quant` is non-empty (``gp.quantize``'s result, issue 18): a
layer rewritten here is no longer a ``matmul``, so the sparse rewrite leaves it alone; a layer
:mod:`.quant_choice` keeps in fp32 (``int8_tolerance``, or slower in int8 under
``kernels="auto"``) stays a ``matmul`` for the sparse rewrite. The layers are matched as the
sparse rewrite matches them (:func:`graphprune.codegen.kernels.relax_layers.match_linear`, both
importers' forms).

Per scheme (``graphprune.ir.quant.QuantSpec``):

* ``w8a8_dynamic`` / ``w8a8_static``: ``reshape(x, [B, K])`` → ``call_tir(quantize_rows)``
  (per-token absmax scales, or the calibrated one) → ``call_tir(gemm_int8)`` (u8 × s8 → int32,
  dequantized in the kernel's epilogue) → reshape back; the int8 weight is packed for the
  target's instruction path (:func:`~graphprune.codegen.kernels.cpu_int8.int8_isa`: AVX-512 VNNI,
  else AVX2) and shipped as new weight arrays; the fp32 weight is dropped when nothing else
  reads it. The bias add goes into the kernel's epilogue, and so does an erf ``gelu`` that
  alone reads that add (BERT's FFN; record ``"activation": "gelu"``). ``kind == "int8_bsr"``
  (:mod:`.quant_choice`): the same quantizer, its output made quad-major once per input
  (``quads_kernel``), then the 1×4-block sparse kernel of :mod:`.kernels.cpu_int8_sparse`
  (block count symbolic: one kernel per shape).
* ``w8`` (weights only): the layer computes in fp32 with the weight dequantized at build time
  (``fake_quantize``): what the torch fake-quant model computes. There is no weight-only int8
  kernel (it would pay only where the layer is memory-bound).

Layers that stay fp32 say why in their record: a ``conv2d`` weight (no int8 conv kernel yet), a
target without an int8 path, a quantized weight the matcher does not find as a Linear. Such a
W8A8 layer computes on its input unquantized (the torch fake-quant model quantizes it), so the
artifact is there closer to float than the fake-quant model, by up to one input step. Every
record goes into the manifest's ``kernels`` table under ``quant:<weight name>`` with
``"kernel": "int8"`` or ``"fp32"``.

Checks (``ConfigError`` naming the parameter): a ``QuantSpec`` keyed by a name that is no weight
of the model, or whose scales do not fit the weight's output channels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from graphprune.codegen.kernels.cpu_int8 import (
    dense_arrays,
    gemm_int8_kernel,
    int8_isa,
    pad_k,
    pad_m,
    quantize_rows_kernel,
)
from graphprune.codegen.kernels.cpu_int8_sparse import (
    bsr_int8_kernel,
    compress_int8_bsr,
    quads_kernel,
    token_vectors,
)
from graphprune.codegen.kernels.relax_layers import match_linear
from graphprune.codegen.lower import LoweredModel, num_inputs
from graphprune.codegen.quant_choice import Int8Chooser, check_tolerance

from graphprune.ir.errors import CodegenUnsupported, ConfigError
from graphprune.ir.quant import QuantSpec, fake_quantize, quantize_weight, weight_scales

__all__ = ["rewrite_quant"]

INT8_SCHEMES = ("w8a8_dynamic", "w8a8_static")


def _specs_by_param(lowered: LoweredModel, quant: dict, aliases: dict | None) -> dict:
    """``{name in lowered.param_names: QuantSpec}``; a key naming no weight is an error."""
    names = set(lowered.param_names)
    out: dict[str, QuantSpec] = {}
    for key, spec in quant.items():
        hits = [n for n in (key, *(aliases or {}).get(key, ())) if n in names]
        if not hits:
            raise ConfigError(
                f"quantization spec of {key!r} names no weight of the model being compiled "
                f"(weights: {sorted(names)[:5]}...): is the graph a capture of this model?"
            )
        for n in hits:
            out[n] = spec
    return out


def _check_scales(name: str, w: np.ndarray, spec: QuantSpec) -> None:
    channels = w.shape[spec.axis % w.ndim]
    if np.asarray(spec.weight_scale).size != channels:
        raise ConfigError(
            f"quantization spec of {name!r}: {np.asarray(spec.weight_scale).size} weight scales "
            f"for {channels} output channels (axis {spec.axis} of {tuple(w.shape)}): the spec "
            f"was computed for another model; quantize the model being compiled"
        )


def _dequantize_w8(lowered: LoweredModel, specs: dict, records: dict) -> LoweredModel:
    """``w8`` weights replaced by their fake-quantized fp32 values (records say so)."""
    params = list(lowered.params)
    for i, name in enumerate(lowered.param_names):
        spec = specs.get(name)
        if spec is None or spec.scheme != "w8":
            continue
        _check_scales(name, params[i], spec)
        params[i] = fake_quantize(params[i], spec)
        records[name] = {"kernel": "fp32", "scheme": "w8", "shape": list(params[i].shape),
                         "reason": "weight-only int8: computed in fp32 with the weight "
                                   "dequantized at build time (no weight-only int8 kernel)"}  # fmt: skip
    return replace(lowered, params=params)


def rewrite_quant(lowered: LoweredModel, target, quant: dict, aliases: dict | None = None,
                  progress=None, kernels: str = "dense",
                  int8_tolerance: float | None = None):  # fmt: skip
    """Rewrite the Linears of ``lowered`` whose weight has a ``QuantSpec`` to INT8 kernels.

    Parameters
    ----------
    lowered : LoweredModel
        From :func:`graphprune.codegen.lower.lower` (``param_names`` filled in); not modified.
    target : tvm.target.Target
    quant : dict of str to QuantSpec
        ``PruneGraph.quant`` (keyed by the source model's parameter names).
    aliases : dict, optional
        ``PruneGraph.aliases`` (other names of a tied weight).
    kernels : str
        ``compile``'s ``kernels``: ``"auto"`` measures int8 dense, int8 block-sparse and fp32
        per layer, ``"bsr"`` forces int8 block-sparse where it fits (:mod:`.quant_choice`).
    int8_tolerance : float, optional
        Layers whose ``QuantSpec.rel_error`` is above it stay fp32.

    Returns
    -------
    (LoweredModel, dict)
        The rewritten model and ``{"quant:<weight>": record}`` for the manifest.

    Examples
    --------
    >>> new, records = rewrite_quant(lowered, make_target("llvm"), pg.quant)  # doctest: +SKIP
    >>> records["quant:fc.weight"]["kernel"]                                   # doctest: +SKIP
    'int8'
    """
    step = progress or (lambda msg: None)
    tol = check_tolerance(int8_tolerance)
    specs = _specs_by_param(lowered, quant, aliases)
    for name, w in zip(lowered.param_names, lowered.params):
        if name in specs:
            _check_scales(name, w, specs[name])
    records: dict[str, dict] = {}
    lowered = _dequantize_w8(lowered, specs, records)
    int8 = {n: s for n, s in specs.items() if s.scheme in INT8_SCHEMES}
    if not int8:
        return lowered, {f"quant:{k}": v for k, v in records.items()}
    try:
        isa = int8_isa(target)
    except CodegenUnsupported as e:
        for name, spec in int8.items():
            records[name] = {"kernel": "fp32", "scheme": spec.scheme, "reason": str(e)}
        return lowered, {f"quant:{k}": v for k, v in records.items()}
    step(f"rewriting {len(int8)} quantized layers to int8 kernels ({isa})")

    def probe(w, batch, kind, spec):
        return _probe(target, isa, w, batch, kind, spec)

    choose = Int8Chooser(target, isa, kernels, tol, probe, step)
    new = _rewrite(lowered, int8, isa, records, choose)
    for name, spec in int8.items():
        records.setdefault(name, {"kernel": "fp32", "scheme": spec.scheme, "reason": (
            "not matched as a Linear (int8 kernels take Linear/MatMul weights only; no int8 "
            "conv yet): computed in fp32 on its weight as given and its input NOT quantized, "
            "so it differs from the fake-quant model by up to one input quantization step")})
    return new, {f"quant:{k}": v for k, v in records.items()}


def _probe(target, isa: str, w: np.ndarray, batch: int, kind: str, spec: QuantSpec):
    """``(vm, args)`` of ``x[batch, K] @ w.T`` alone, built as ``kind``: ``"fp32"`` (what the
    sparse rewrite's ``auto`` makes of it) or an int8 kernel with ``spec``'s scheme."""
    from graphprune.codegen.sparse_rewrite import compile_probe, rewrite_sparse, single_linear

    lowered = replace(single_linear(w, batch), param_names=["w"])
    own = QuantSpec(spec.scheme, weight_scales(w, 0), 0, spec.act_scale)
    # fp32 as auto would run it: its input through the int8 quantizer and back
    choice = (kind, {"input": "fake-quantized"} if kind == "fp32" else {})
    lowered = _rewrite(lowered, {"w": own}, isa, {}, lambda *a: choice)
    if kind == "fp32":
        lowered, _ = rewrite_sparse(lowered, target, kernels="auto")
    return compile_probe(lowered, None, target, 16)


def _rewrite(lowered: LoweredModel, specs: dict, isa: str, records: dict,
             choose) -> LoweredModel:  # fmt: skip
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    main = lowered.mod["main"]
    num_input = num_inputs(main)
    weight_vars = main.params[num_input:]
    weight_of = {p: v for p, v in zip(weight_vars, lowered.params)}
    name_of = {p: n for p, n in zip(weight_vars, lowered.param_names)}
    new_params: list = []
    new_values: list[np.ndarray] = []
    funcs: dict[str, object] = {}

    def add_func(builder, func, fname):
        if fname not in funcs:
            funcs[fname] = builder.add_func(func.with_attr("global_symbol", fname), fname)
        return funcs[fname]

    errors: list[ConfigError] = []
    bias_of, add_of, gelu_of = _bias_adds(main, weight_of)
    fused: list = []  # the original add calls whose bias went into an int8 kernel
    fused_gelu: list = []  # the original gelu calls an int8 kernel's epilogue applies
    quantized: list = []  # ((input var, rows, K, static scale, isa), (xu, xs)) emitted so far
    transposed_inputs: list = []  # ((xu, xs), (xt, xsp)): quad-major copies for int8_bsr
    dequantized: list = []  # fp32 layers fed their quantizer's output, dequantized
    single_block = len(main.body.blocks) == 1

    @mutator
    class _Mutator(PyExprMutator):
        def visit_call_(self, call):
            original = call
            call = super().visit_call_(call)
            if any(original.same_as(a) for a in fused):  # its matmul now adds the bias
                return call.args[add_of[original][0]]
            if any(original.same_as(g) for g in fused_gelu):  # and applies the gelu
                return call.args[0]
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
                return call
            try:
                return self.rewrite(call, bias_of.get(original))
            except ConfigError as e:  # raised again below: through TVM's FFI it would come
                errors.append(e)  # back as a RuntimeError
                return call

        def rewrite(self, call, bias):
            layer = match_linear(call, *call.args, weight_of, self.lookup_binding)
            if layer is None or name_of.get(layer.weight) not in specs:
                return call
            name = name_of[layer.weight]
            spec, w = specs[name], weight_of[layer.weight]
            _check_scales(name, w, spec)
            # the matcher's dense matrix is the weight itself (Linear, [N, K]) or its transpose
            # (ONNX MatMul, [K, N]); the spec's axis must be the output channels either way
            transposed = layer.dense is not w
            if spec.axis % 2 != (1 if transposed else 0):
                raise ConfigError(
                    f"quantization spec of {name!r}: axis {spec.axis} is not the output-channel "
                    f"axis of the weight {tuple(w.shape)} as the model uses it"
                )
            wq = quantize_weight(w, spec)
            wq = np.ascontiguousarray(wq.T if transposed else wq)
            n, k = wq.shape
            batch = layer.batch
            kind, choice = choose(name, np.asarray(layer.dense, np.float32), wq, spec, batch)
            static = spec.act_scale if spec.scheme == "w8a8_static" else None
            if kind == "fp32":
                records[name] = {"kernel": "fp32", "scheme": spec.scheme, "shape": [n, k],
                                 "batch": batch, **choice}  # fmt: skip
                if choice.get("input") != "fake-quantized":
                    return call
                # chosen for speed, not accuracy: the same numbers as the int8 kernel (its
                # quantizer, dequantized), so the choice never changes what the model computes
                xu, xs = self.quantized_input(call.args[0], name, batch, k, static, isa)
                xf = relax.op.astype(relax.op.strided_slice(xu, [0, 1], [0, 0], [batch, k]),
                                     "int32")  # fmt: skip
                xf = relax.op.multiply(relax.op.astype(relax.op.subtract(
                    xf, relax.const(128, "int32")), "float32"), relax.op.reshape(xs, (batch, 1)))
                xf = relax.op.reshape(self.builder_.emit(xf), call.args[0].ty.shape)
                dequantized.append(name)
                return relax.op.matmul(self.builder_.emit(xf), call.args[1])
            if bias is not None and weight_of[bias[1]].shape != (n,):
                bias = None
            bias_value = None if bias is None else weight_of[bias[1]]
            if kind == "int8_bsr":
                blocks = compress_int8_bsr(wq)
                gname = f"int8_bsr_{batch}x{n}x{k}_c{blocks.chunks}" + ("_bias" if bias else "")
                gf = add_func(self.builder_, bsr_int8_kernel(
                    batch, n, k, None, blocks.chunks, bias=bool(bias)), gname)  # fmt: skip
                arrays = [*blocks.arrays, np.asarray(spec.weight_scale, np.float32).reshape(-1)]
                if bias is not None:
                    arrays.append(np.asarray(bias_value, np.float32).reshape(-1))
            else:
                gelu = gelu_of.get(bias[0]) if bias is not None else None
                gname = f"int8_gemm_{isa}_{batch}x{n}x{k}" + ("_bias" if bias else "") + (
                    "_gelu" if gelu is not None else "")  # fmt: skip
                gf = add_func(self.builder_, gemm_int8_kernel(
                    batch, n, k, isa, bias=bool(bias), activation="gelu" if gelu is not None
                    else None), gname)  # fmt: skip
                if gelu is not None:
                    fused_gelu.append(gelu)
                    choice = {**choice, "activation": "gelu"}
                arrays = dense_arrays(wq, spec.weight_scale, bias_value, isa)
            vars_ = []
            for i, arr in enumerate(arrays):
                v = relax.Var(f"{name}_int8_{i}", relax.TensorType(arr.shape, str(arr.dtype)))
                new_params.append(v)
                new_values.append(arr)
                vars_.append(v)
            emit = self.builder_.emit
            xu, xs = seen = self.quantized_input(call.args[0], name, batch, k, static, isa)
            out_ty = relax.TensorType((batch, n), "float32")
            if kind == "int8_bsr":
                xt, xsp = self.quads(seen, batch, k, isa)
                y = emit(relax.call_tir(gf, [xt, *vars_[:5], xsp, *vars_[5:]], out_ty=out_ty))
            else:
                y = emit(relax.call_tir(gf, [xu, vars_[0], vars_[1], xs, *vars_[2:]],
                                        out_ty=out_ty))  # fmt: skip
            records[name] = {"kernel": kind, "scheme": spec.scheme, "isa": isa,
                             "shape": [n, k], "batch": batch, **choice}  # fmt: skip
            if bias is not None:
                fused.append(bias[0])
                records[name]["bias"] = name_of[bias[1]]
            out_shape = [int(d) for d in call.ty.shape.values]
            return y if len(out_shape) == 2 else relax.op.reshape(y, out_shape)

        def quantized_input(self, x, name, batch, k, static, isa):
            """``(xu, xs)``: the quantizer's outputs for the layer input ``x``."""
            emit = self.builder_.emit
            qname = f"int8_quantize_rows_{batch}x{k}" + ("" if static is None else f"_s{name}")
            qf = add_func(self.builder_, quantize_rows_kernel(batch, k, static, isa),
                          _sym(f"{qname}_{isa}"))  # fmt: skip
            # one quantizer per input (attention's Q, K and V projections read the same
            # activations, each through its own reshape); shared only where the quantizer's
            # outputs are sure to be in scope: a dataflow var's consumers are in its block, and
            # a function with one dataflow block has every consumer in it
            bound = self.lookup_binding(x) if isinstance(x, relax.Var) else None
            while (isinstance(bound, relax.Call) and getattr(bound.op, "name", "")
                   == "relax.reshape" and isinstance(bound.args[0], relax.Var)):  # fmt: skip
                x = bound.args[0]
                bound = self.lookup_binding(x)
            shareable = isinstance(x, relax.DataflowVar) or single_block
            seen = next((q for key, q in quantized if key[0].same_as(x) and key[1:] == (
                batch, k, static, isa)), None) if shareable else None  # fmt: skip
            if seen is None:
                x2 = emit(relax.op.reshape(x, (batch, k)))
                q = emit(relax.call_tir(qf, [x2], out_ty=[
                    relax.TensorType((pad_m(batch, isa), pad_k(k, isa)), "uint8"),
                    relax.TensorType((batch,), "float32")]))  # fmt: skip
                seen = emit(relax.TupleGetItem(q, 0)), emit(relax.TupleGetItem(q, 1))
                quantized.append(((x, batch, k, static, isa), seen))
            return seen

        def quads(self, seen, batch, k, isa):
            """The quantized input ``seen`` quad-major (:func:`quads_kernel`), once per input."""
            hit = next((q for key, q in transposed_inputs if key is seen), None)
            if hit is None:
                mv, kg = token_vectors(batch) * 16, pad_k(k) // 4
                qf = add_func(self.builder_, quads_kernel(batch, k, pad_m(batch, isa),
                              pad_k(k, isa)), f"int8_quads_{batch}x{k}_{isa}")  # fmt: skip
                t = self.builder_.emit(relax.call_tir(qf, list(seen), out_ty=[
                    relax.TensorType((kg, mv), "int32"), relax.TensorType((mv,), "float32")]))
                hit = (self.builder_.emit(relax.TupleGetItem(t, 0)),
                       self.builder_.emit(relax.TupleGetItem(t, 1)))  # fmt: skip
                transposed_inputs.append((seen, hit))
            return hit

    m = _Mutator(lowered.mod)
    new_main = m.visit_expr(main)
    if errors:
        raise errors[0]
    if not new_params and not dequantized:
        return lowered
    func = relax.Function(list(new_main.params) + new_params, new_main.body, new_main.ret_ty,
                          new_main.is_pure, new_main.attrs)  # fmt: skip
    func = relax.analysis.remove_all_unused(func)
    used = set(relax.analysis.free_vars(func.body))
    names = list(lowered.param_names) + [v.name for v in new_params]
    keep = [(p, v, nm) for p, v, nm in zip(func.params[num_input:],
            lowered.params + new_values, names) if p in used]  # fmt: skip
    func = relax.Function(list(func.params[:num_input]) + [p for p, _, _ in keep], func.body,
                          func.ret_ty, func.is_pure, func.attrs)  # fmt: skip
    out_mod = m.builder_.get()
    out_mod[out_mod.get_global_var("main")] = func
    return replace(lowered, mod=out_mod, params=[v for _, v, _ in keep],
                   param_names=[nm for _, _, nm in keep])  # fmt: skip


def _bias_adds(main, weight_of: dict):
    """``({matmul call: (add call, bias var)}, {add call: (matmul operand index, bias var)},
    {add call: gelu call})`` for every ``add(mm, b)`` / ``add(b, mm)`` in ``main`` where ``mm``
    is bound to a matmul read by nothing else and ``b`` a 1-D weight parameter: the adds an int8
    kernel can absorb (its epilogue adds the bias), so the bias costs no second pass over the
    output; and the erf ``gelu`` that alone reads such an add (BERT's FFN), which the epilogue
    then applies too."""
    from tvm import relax

    bindings = [b for block in main.body.blocks for b in block.bindings]
    value_of = {b.var: b.value for b in bindings}
    var_of = {b.value: b.var for b in bindings}
    uses: dict = {}
    for expr in [b.value for b in bindings] + [main.body.body]:
        for v in relax.analysis.free_vars(expr):
            uses[v] = uses.get(v, 0) + 1
    bias_of, add_of = {}, {}
    gelu_of = {}  # add call -> the nn.gelu call that alone reads its result
    readers: dict = {}
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for a in b.value.args:
                readers.setdefault(a, []).append(b.value)
    for b in bindings:
        call = b.value
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.add"):
            continue
        for i in (0, 1):
            mm, bias = call.args[i], call.args[1 - i]
            mm_call = value_of.get(mm)
            if (isinstance(mm_call, relax.Call) and getattr(mm_call.op, "name", "")
                    == "relax.matmul" and uses.get(mm) == 1 and bias in weight_of
                    and weight_of[bias].ndim == 1 and weight_of[bias].dtype == np.float32):  # fmt: skip
                bias_of[mm_call] = (call, bias)
                add_of[call] = (i, bias)
                v, after = b.var, readers.get(b.var, [])
                while (uses.get(v) == 1 and len(after) == 1  # through reshapes (torch's 3-D
                       and getattr(after[0].op, "name", "") == "relax.reshape"):  # Linear)
                    v = var_of[after[0]]
                    after = readers.get(v, [])
                if (uses.get(v) == 1 and len(after) == 1
                        and getattr(after[0].op, "name", "") == "relax.nn.gelu"):  # fmt: skip
                    gelu_of[call] = after[0]
                break
    return bias_of, add_of, gelu_of


def _sym(name: str) -> str:
    """A C symbol from a name that may hold a parameter's dots."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
