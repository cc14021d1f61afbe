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
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
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


def _tensor_type_spec(name: str, ty) -> IOSpec:
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise CodegenUnsupported(f"{name}: expected a tensor of static shape, got {ty}")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except (TypeError, ValueError, AttributeError) as e:
        raise CodegenUnsupported(
            f"{name}: dynamic shape {ty.shape} is not supported; export with static shapes"
        ) from e
    return IOSpec(name, shape, str(ty.dtype))


def _finish(mod, frontend: str, input_names: list[str] | None, source_names: dict[str, str]):
    """``source_names``: Relax parameter name -> the source model's name of that weight."""
    from tvm import relax

    mod, detached = relax.frontend.detach_params(mod)
    params = [p.numpy() for p in detached.get("main", [])]
    main = mod["main"]
    num_input = num_inputs(main)
    if len(main.params) - num_input != len(params):
        raise CodegenUnsupported(
            f"{frontend}: {len(main.params) - num_input} weight inputs but {len(params)} values"
        )
    inputs = []
    for i, var in enumerate(main.params[:num_input]):
        name = input_names[i] if input_names else var.name_hint
        inputs.append(_tensor_type_spec(name, var.ty))
    ret = main.ret_ty if hasattr(main, "ret_ty") else main.body.ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    outputs = [_tensor_type_spec(f"output{i}", t) for i, t in enumerate(fields)]
    names = [source_names.get(v.name, v.name) for v in main.params[num_input:]]
    return LoweredModel(mod, params, inputs, outputs, frontend, names)


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


def lower_torch(model, example_inputs) -> LoweredModel:
    """Lower ``model`` (an ``nn.Module``) traced on ``example_inputs`` through ``torch.export``.

    Examples
    --------
    >>> import torch
    >>> lowered = lower_torch(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),))
    >>> [p.shape for p in lowered.params]
    [(2, 4), (2,)]
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
    try:
        with torch.no_grad():
            program = torch.export.export(model, example_inputs)
    except Exception as e:  # torch.export raises many unrelated types
        raise CaptureError(f"torch.export failed on {type(model).__name__}: {e}") from e
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
    return _finish(mod, "torch", names if len(names) == len(example_inputs) else None, weights)


def lower_onnx(model, shape_dict: dict[str, tuple[int, ...]] | None = None) -> LoweredModel:
    """Lower an ONNX model (path or ``ModelProto``); dynamic input dims need ``shape_dict``."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    if isinstance(model, (str, os.PathLike)):
        try:
            model = onnx.load(os.fspath(model))
        except Exception as e:
            raise CaptureError(f"cannot read ONNX file {model}: {e}") from e
    initializers = {t.name for t in model.graph.initializer}
    shapes, dtypes = {}, {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        given = (shape_dict or {}).get(inp.name)
        if given is not None:
            dims = list(given)
        if any(d is None or d <= 0 for d in dims):
            raise ConfigError(
                f"ONNX input {inp.name!r} has dynamic shape {dims}: pass its static shape "
                f"(shape_dict={{'{inp.name}': (...)}} or example_inputs)"
            )
        shapes[inp.name] = dims
        dtypes[inp.name] = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as e:
        raise CodegenUnsupported(f"TVM's ONNX importer rejected the model: {e}") from e
    # The importer names a weight parameter after its initializer, minus an "onnx::" prefix.
    weights = {t.name.removeprefix("onnx::"): t.name for t in model.graph.initializer}
    return _finish(mod, "onnx", list(shapes), weights)


def lower(model_or_onnx, example_inputs=None) -> LoweredModel:
    """Dispatch on the kind of ``model_or_onnx`` (:func:`graphprune.frontends.kind_of`): ONNX
    path/ModelProto or torch module."""
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
        return lower_onnx(model_or_onnx, shape_dict)
    return lower_torch(model_or_onnx, example_inputs)
