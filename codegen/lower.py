"""Lower a torch module or an ONNX model to a Relax ``IRModule`` whose weights are inputs.

First step of codegen: ``torch.export`` → ``from_exported_program``, or ``onnx`` →
``from_onnx``, both with parameters kept as function inputs (``num_input`` attribute) and then
detached, so the pipeline can lift weight-only computation (transposes, layout changes, BN
arithmetic) out of the model and ship the result as ``weights.npz`` instead of baking it into
the shared library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from graphprune.ir.errors import CaptureError, CodegenUnsupported, ConfigError

__all__ = ["IOSpec", "LoweredModel", "lower", "lower_onnx", "lower_torch"]


@dataclass(frozen=True)
class IOSpec:
    """Name, shape and dtype of one model input or output. A dynamic axis is the name of its
    symbolic dim (a key of :attr:`LoweredModel.dims`); a derived one (``2 * seq``) its
    expression."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class LoweredModel:
    """A Relax module ``main(*inputs, *params)`` plus the params' values, in order.

    ``param_names[i]`` is the source model's name of ``params[i]`` (torch state-dict name, ONNX
    initializer name), what :attr:`graphprune.ir.PruneGraph.masks` is keyed by; empty where
    the module was built by hand (the ``auto`` chooser's probes).
    """

    mod: object  # tvm.IRModule
    params: list[np.ndarray]
    inputs: list[IOSpec]
    outputs: list[IOSpec] = field(default_factory=list)
    frontend: str = ""
    param_names: list[str] = field(default_factory=list)
    # Symbolic dims of the inputs: name -> (min, max), max ``None`` when unbounded. Empty for a
    # static model. The Relax functions carry the same bounds (``tir_var_upper_bound``).
    dims: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def _tensor_type_spec(
    name: str, ty, rename: dict[str, str] | None = None, output: bool = False
) -> IOSpec:
    from tvm import relax, tirx

    if output and isinstance(ty, relax.TensorType) and ty.shape is None and ty.ndim >= 0:
        # Relax lost the extents (a data-dependent op on dynamic dims): rank only; the VM
        # returns the real shape.
        return IOSpec(name, ("?",) * int(ty.ndim), str(ty.dtype))
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise CodegenUnsupported(f"{name}: expected a tensor of known rank and shape, got {ty}")
    shape: list[int | str] = []
    for d in ty.shape.values:
        if isinstance(d, tirx.IntImm):
            shape.append(int(d))
        elif isinstance(d, tirx.Var):
            shape.append((rename or {}).get(d.name, d.name))
        else:  # a derived extent (2 * s0): recorded as text, checked by the VM itself
            shape.append(str(d))
    return IOSpec(name, tuple(shape), str(ty.dtype))


def _dim_bounds(main) -> dict[str, tuple[int, int | None]]:
    """``{var: (min, max)}`` of the symbolic dims of ``main``'s model inputs, from its
    ``tir_var_lower_bound`` / ``tir_var_upper_bound`` attributes (min 0, max ``None`` where
    absent)."""
    from tvm import tirx

    lower_b = dict(main.attrs["tir_var_lower_bound"]) if "tir_var_lower_bound" in main.attrs else {}
    upper_b = dict(main.attrs["tir_var_upper_bound"]) if "tir_var_upper_bound" in main.attrs else {}
    dims: dict[str, tuple[int, int | None]] = {}
    for var in main.params[: num_inputs(main)]:
        shape = getattr(var.ty, "shape", None)
        for d in shape.values if shape is not None else ():
            if isinstance(d, tirx.Var) and d.name not in dims:
                hi = upper_b.get(d.name)
                dims[d.name] = (int(lower_b.get(d.name, 0)), None if hi is None else int(hi))
    return dims


def _finish(
    mod,
    frontend: str,
    input_names: list[str] | None,
    source_names: dict[str, str],
    rename: dict[str, str] | None = None,
):
    """``source_names``: Relax parameter name -> the source model's name of that weight;
    ``rename``: symbolic dim name in Relax (``s77``) -> the user's name of it (``batch``)."""
    from tvm import relax

    mod, detached = relax.frontend.detach_params(mod)
    params = [p.numpy() for p in detached.get("main", [])]
    if _dim_bounds(mod["main"]):
        from graphprune.codegen.bounded_shapes import simplify_bounded_shapes

        mod = simplify_bounded_shapes(mod)
    main = mod["main"]
    num_input = num_inputs(main)
    if len(main.params) - num_input != len(params):
        raise CodegenUnsupported(
            f"{frontend}: {len(main.params) - num_input} weight inputs but {len(params)} values"
        )
    inputs = []
    for i, var in enumerate(main.params[:num_input]):
        name = input_names[i] if input_names else var.name_hint
        inputs.append(_tensor_type_spec(name, var.ty, rename))
    ret = main.ret_ty if hasattr(main, "ret_ty") else main.body.ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    outputs = [
        _tensor_type_spec(f"output{i}", t, rename, output=True) for i, t in enumerate(fields)
    ]
    names = [source_names.get(v.name, v.name) for v in main.params[num_input:]]
    dims = {(rename or {}).get(k, k): v for k, v in _dim_bounds(main).items()}
    return LoweredModel(mod, params, inputs, outputs, frontend, names, dims)


def num_inputs(main) -> int:
    """How many leading parameters of a Relax ``main`` are model inputs (the rest are weights)."""
    return int(main.attrs["num_input"]) if "num_input" in main.attrs else len(main.params)


def each_function_pass(name: str, mutator):
    """A module pass running ``mutator(mod)`` (a ``PyExprMutator`` class) over every Relax
    function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        rewriter = mutator(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


def _torch_cumsum_dtype():
    """``cumsum`` of a bool or small-int tensor is ``int64`` in torch (integral inputs are
    promoted unless ``dtype`` is given); TVM 0.27's importer keeps the input dtype, so a bool
    cumsum (transformers' position ids and causal masks from an attention mask, e.g. Llama)
    becomes a bool tensor: wrong values, then LLVM aborts on a non-float ``add`` of ``i1``.
    Rewrite it as ``cumsum(x, dtype="int64")``; the consumers' types are re-inferred."""
    import tvm
    from tvm import relax

    cumsum = tvm.ir.Op.get("relax.cumsum")

    @relax.expr_functor.mutator
    class _Cumsum(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(cumsum):
                return call
            x = call.args[0]
            dtype = str(x.ty.dtype) if isinstance(x.ty, relax.TensorType) else ""
            if dtype not in ("bool", "int8", "uint8", "int16", "int32"):
                return call
            if str(call.ty.dtype) == "int64":
                return call
            return relax.op.cumsum(x, call.attrs.axis, "int64", call.attrs.exclusive)

    return each_function_pass("GraphPruneTorchCumsumDtype", _Cumsum)


def _float_sdpa_masks(program):
    """Boolean ``attn_mask`` of ``scaled_dot_product_attention`` as the additive float mask the
    importer requires (``0`` where attended, ``-3.4e38`` where masked: ``exp`` underflows to 0
    as with ``-inf``, and no ``0 * inf`` NaN)."""
    import torch

    aten = torch.ops.aten
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default or len(node.args) < 4:
            continue
        mask = node.args[3]
        val = getattr(mask, "meta", {}).get("val")
        if val is None or val.dtype != torch.bool:
            continue
        q = node.args[0].meta["val"]
        with graph.inserting_before(node):
            as_float = graph.call_function(aten._to_copy.default, (mask,), {"dtype": q.dtype})
            masked = graph.call_function(aten.rsub.Scalar, (as_float, 1.0))
            additive = graph.call_function(aten.mul.Tensor, (masked, -3.4e38))
        with val.fake_mode:
            f = val.to(q.dtype)
            as_float.meta["val"] = f
            masked.meta["val"] = 1.0 - f
            additive.meta["val"] = (1.0 - f) * -3.4e38
        node.args = (*node.args[:3], additive, *node.args[4:])
    program.graph_module.recompile()
    return program


def _per_input_specs(model, args: tuple, dynamic_shapes) -> list:
    """``dynamic_shapes`` (torch.export's format: a tuple or a dict following ``forward``'s
    parameters, a ``*args`` parameter taking a tuple of its own) as one entry per input."""
    import inspect

    if dynamic_shapes is None:
        return [None] * len(args)
    if not isinstance(dynamic_shapes, (tuple, list, dict)):
        raise ConfigError(
            f"dynamic_shapes for a torch model takes torch.export's format (a tuple per input or "
            f"a dict by forward's argument names), not {type(dynamic_shapes).__name__}"
        )
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]  # fmt: skip
    out: list = []
    for j, p in enumerate(params):
        if len(out) >= len(args):
            break
        if isinstance(dynamic_shapes, dict):
            spec = dynamic_shapes.get(p.name)
        else:
            spec = dynamic_shapes[j] if j < len(dynamic_shapes) else None
        if p.kind == p.VAR_POSITIONAL:
            out.extend(spec or [])
            break
        out.append(spec)
    return (out + [None] * len(args))[: len(args)]


def _user_dim_names(program, model, args: tuple, dynamic_shapes) -> dict[str, str]:
    """Symbol torch.export chose (``s77``) -> the name of the user's ``Dim`` (``batch``), for the
    axes declared with a named ``torch.export.Dim`` (the manifest and loader errors speak the
    user's names)."""
    specs = _per_input_specs(model, args, dynamic_shapes)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    by_name = {n.name: n for n in placeholders}
    rename: dict[str, str] = {}
    for spec, pname in zip(specs, users):
        node = by_name.get(pname)
        val = getattr(node, "meta", {}).get("val") if node is not None else None
        if spec is None or val is None:
            continue
        axes = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for axis, dim in axes:
            name = getattr(dim, "__name__", None)
            if name is None or axis >= val.dim():
                continue
            size = val.shape[axis]
            sym = str(size.node.expr) if hasattr(size, "node") else None
            if sym is not None and sym.isidentifier() and sym not in rename:
                rename[sym] = name
    return rename


def lower_torch(model, example_inputs, dynamic_shapes=None) -> LoweredModel:
    """Lower ``model`` (an ``nn.Module``) traced on ``example_inputs`` through ``torch.export``.

    ``dynamic_shapes`` (torch.export's own format, ``torch.export.Dim`` with ``min``/``max``)
    keeps the declared axes symbolic; their bounds become the Relax functions'
    ``tir_var_lower_bound``/``tir_var_upper_bound``. ``None``: every shape static.

    Examples
    --------
    >>> import torch
    >>> lowered = lower_torch(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),))
    >>> [p.shape for p in lowered.params]
    [(2, 4), (2,)]
    >>> batch = torch.export.Dim("batch", min=1, max=32)
    >>> lower_torch(torch.nn.Linear(4, 2), (torch.randn(2, 4),), ({0: batch},)).dims
    {'batch': (1, 32)}
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if example_inputs is None:
        raise ConfigError("compiling a torch model needs example_inputs (a tuple of tensors)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(
        torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in example_inputs
    )
    model = model.eval()
    _per_input_specs(model, example_inputs, dynamic_shapes)  # refuses a malformed argument
    try:
        with torch.no_grad():
            program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # torch.export raises many unrelated types
        if dynamic_shapes is not None:
            raise ConfigError(
                f"torch.export refused dynamic_shapes={dynamic_shapes!r} for "
                f"{type(model).__name__} (an axis the model specialises on cannot be dynamic: "
                f"declare it static or narrow its min/max as torch suggests): {e}"
            ) from e
        raise CaptureError(f"torch.export failed on {type(model).__name__}: {e}") from e
    rename = _user_dim_names(program, model, example_inputs, dynamic_shapes)
    try:
        try:
            mod = from_exported_program(program, keep_params_as_input=True)
        except ValueError as e:
            if "Cannot view a tensor" not in str(e):
                raise
            # torch's decomposition of scaled_dot_product_attention (which the importer runs
            # first) gives its output other strides than eager, and a later .view() of it is
            # then refused (GPT-2's Conv1D). The importer translates sdpa itself: keep it.
            table = {
                k: v for k, v in torch.export.default_decompositions().items()
                if "scaled_dot_product_attention" not in str(k)
            }  # fmt: skip
            program = _float_sdpa_masks(program.run_decompositions(table))
            mod = from_exported_program(
                program, keep_params_as_input=True, run_ep_decomposition=False
            )
        mod = _torch_cumsum_dtype()(mod)
    except Exception as e:
        raise CodegenUnsupported(
            f"TVM's torch importer rejected {type(model).__name__}: {e}"
        ) from e
    specs = program.graph_signature.input_specs
    names = [s.arg.name for s in specs if s.kind.name == "USER_INPUT"]
    # The importer names each weight parameter after its placeholder (``p_0_weight``); the
    # spec's target is the state-dict name (``0.weight``).
    weights = {s.arg.name: s.target for s in specs if s.target is not None}
    return _finish(
        mod, "torch", names if len(names) == len(example_inputs) else None, weights, rename
    )


def _onnx_dynamic_dims(dynamic_shapes) -> dict[str, tuple[int, int | None]]:
    """``{dim_param: (min, max)}`` checked: positive integers, ``min <= max``."""
    if dynamic_shapes is None:
        return {}
    if not isinstance(dynamic_shapes, dict):
        raise ConfigError(
            "dynamic_shapes for an ONNX model is {dim_param: (min, max)}, e.g. "
            f"{{'batch': (1, 64)}}; got {type(dynamic_shapes).__name__}"
        )
    dims = {}
    for name, rng in dynamic_shapes.items():
        try:
            lo, hi = rng
            lo, hi = int(lo), None if hi is None else int(hi)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"dynamic_shapes[{name!r}] = {rng!r}: give (min, max) integers, max may be None"
            ) from e
        if lo < 0 or (hi is not None and hi < max(lo, 1)):
            raise ConfigError(f"dynamic_shapes[{name!r}] = {rng!r}: need 0 <= min <= max, max >= 1")
        dims[str(name)] = (lo, hi)
    return dims


def lower_onnx(
    model, shape_dict: dict[str, tuple[int, ...]] | None = None, dynamic_shapes=None
) -> LoweredModel:
    """Lower an ONNX model (path or ``ModelProto``).

    An input dim that is a ``dim_param`` stays symbolic when ``dynamic_shapes`` names it
    (``{dim_param: (min, max)}``; the bounds become ``tir_var_lower_bound`` /
    ``tir_var_upper_bound`` on ``main``); otherwise it needs a static size from ``shape_dict``
    (an input's whole shape, or ``example_inputs``).
    """
    import onnx
    from tvm import tirx
    from tvm.relax.frontend.onnx import from_onnx

    if isinstance(model, (str, os.PathLike)):
        try:
            model = onnx.load(os.fspath(model))
        except Exception as e:
            raise CaptureError(f"cannot read ONNX file {model}: {e}") from e
    dynamic = _onnx_dynamic_dims(dynamic_shapes)
    symbols = {name: tirx.Var(name, "int64") for name in dynamic}
    initializers = {t.name for t in model.graph.initializer}
    known = {
        d.dim_param for i in model.graph.input if i.name not in initializers
        for d in i.type.tensor_type.shape.dim if d.dim_param
    }  # fmt: skip
    unknown = sorted(set(dynamic) - known)
    if unknown:
        raise ConfigError(
            f"dynamic_shapes names {unknown}, which no model input has as a dim_param "
            f"(the inputs' dim_params: {sorted(known) or 'none'})"
        )
    shapes, dtypes = {}, {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        params = [d.dim_param if d.HasField("dim_param") else None for d in tt.shape.dim]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        given = (shape_dict or {}).get(inp.name)
        if given is not None:
            dims = list(given)
        if len(params) == len(dims):
            dims = [symbols.get(p, d) if p else d for p, d in zip(params, dims)]
        if any(d is None or (isinstance(d, int) and d <= 0) for d in dims):
            named = [p for p, d in zip(params, dims) if d is None and p]
            hint = f" or dynamic_shapes={{'{named[0]}': (min, max)}}" if named else ""
            shown = [p or d for p, d in zip(params, dims)] if len(params) == len(dims) else dims
            raise ConfigError(
                f"ONNX input {inp.name!r} has dynamic shape {shown}: pass its static "
                f"shape (shape_dict={{'{inp.name}': (...)}} or example_inputs){hint}"
            )
        shapes[inp.name] = dims
        dtypes[inp.name] = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as e:
        raise CodegenUnsupported(f"TVM's ONNX importer rejected the model: {e}") from e
    if dynamic:
        main = mod["main"].with_attr(
            "tir_var_lower_bound", {k: lo for k, (lo, _) in dynamic.items()}
        )
        upper = {k: hi for k, (_, hi) in dynamic.items() if hi is not None}
        if upper:
            main = main.with_attr("tir_var_upper_bound", upper)
        mod.update_func(mod.get_global_var("main"), main)
    # The importer names a weight parameter after its initializer, minus an "onnx::" prefix.
    weights = {t.name.removeprefix("onnx::"): t.name for t in model.graph.initializer}
    return _finish(mod, "onnx", list(shapes), weights)


def lower(model_or_onnx, example_inputs=None, dynamic_shapes=None) -> LoweredModel:
    """Dispatch on the kind of ``model_or_onnx`` (:func:`graphprune.frontends.kind_of`): ONNX
    path/ModelProto or torch module. ``dynamic_shapes``: see :func:`lower_torch` and
    :func:`lower_onnx` (each frontend's own format)."""
    from graphprune.frontends import kind_of

    if kind_of(model_or_onnx) == "onnx":
        shape_dict = None
        if example_inputs is not None:
            import onnx

            proto = model_or_onnx
            if isinstance(proto, (str, os.PathLike)):
                proto = onnx.load(os.fspath(proto), load_external_data=False)
            inits = {t.name for t in proto.graph.initializer}
            names = [i.name for i in proto.graph.input if i.name not in inits]
            shape_dict = {n: tuple(np.asarray(x).shape) for n, x in zip(names, example_inputs)}
        return lower_onnx(model_or_onnx, shape_dict, dynamic_shapes)
    return lower_torch(model_or_onnx, example_inputs, dynamic_shapes)
