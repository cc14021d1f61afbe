"""``compile``: torch module or ONNX model in, loaded :class:`~graphprune.runtime.Artifact` out.

Chains the codegen stages: :mod:`.lower` (to Relax, weights as parameters) → :mod:`.masks`
(sparsity masks from the IR, when a graph carrying them is given) → :mod:`.quant_rewrite`
(quantized Linears to INT8 kernels, when the graph's ``quant`` is non-empty) →
:mod:`.sparse_rewrite` (sparse Linears and convs to our kernels, ``kernels != "dense"``) →
:mod:`.build` (optimise, schedule, compile) → :mod:`.artifact` (write atomically) → :func:`graphprune.runtime.load`
(verify and open). Codegen reads the model it is given and, optionally, the masks of its IR
(``PruneGraph.masks``): pruning must already be applied (``remove_channels`` / write-back), so a
structurally pruned model compiles like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from graphprune.codegen.artifact import check_out_dir, write_artifact
from graphprune.codegen.build import build
from graphprune.codegen.index_checks import check_index_inputs
from graphprune.codegen.lower import lower
from graphprune.codegen.masks import apply_masks
from graphprune.codegen.quant_rewrite import rewrite_quant
from graphprune.codegen.sparse_rewrite import rewrite_sparse
from graphprune.codegen.target import check_device, make_target, target_to_dict

from graphprune.ir import PruneGraph
from graphprune.ir.errors import ConfigError

__all__ = ["compile"]


def compile(
    model_or_onnx,
    example_inputs=None,
    target="llvm",
    out_dir=None,
    tune: bool = False,
    trials: int = 0,
    schedule: str = "ours",
    progress=None,
    kernels: str = "dense",
    tuning_dir=None,
    *,
    graph: PruneGraph | None = None,
    dynamic_shapes=None,
    load: bool = True,
    int8_tolerance: float | None = None,
):
    """Compile a model to a TVM artifact directory and return it loaded.

    Parameters
    ----------
    model_or_onnx : torch.nn.Module, onnx.ModelProto, str, os.PathLike or a result
        A torch module (exported with ``torch.export``) or an ONNX model / ``.onnx`` path; or a
        result carrying both (any object with ``.model`` and ``.graph``, e.g. ``gp.prune``'s),
        which compiles ``.model`` with ``graph=.graph``.
    example_inputs : tuple of tensors or arrays, optional
        Required for torch; for ONNX only needed when an input has dynamic dims that
        ``dynamic_shapes`` does not name. Without ``dynamic_shapes`` the shapes are baked in:
        the artifact accepts exactly these shapes and dtypes.
    dynamic_shapes : optional
        Axes that stay symbolic in the artifact. Torch: ``torch.export``'s own format
        (``torch.export.Dim(name, min=, max=)`` per input axis, a tuple per input or a dict by
        ``forward``'s argument names). ONNX: ``{dim_param: (min, max)}``. The bounds become the
        kernels' ``tir_var_upper_bound``; the manifest lists each dynamic dim under
        ``dynamic_dims`` (``{name: [min, max]}``, max ``null`` when unbounded) and the inputs'
        shapes name it. Default ``None``: every axis static, as before (one artifact per shape
        runs fastest; see ``benchmarks/bench_dynamic.py`` for what a dynamic artifact costs).
        Not combinable with ``tune=True`` (it specialises on the batch). Sparse ``kernels``
        take a symbolic batch in the row-major CSR and N:M kernels (AVX-512, Linear sizes
        multiples of 16); other sparse layers stay dense, with the reason in the manifest.
    target : {"llvm", "cuda"} or dict
        ``"llvm"`` detects the CPU (explicit ``mcpu``, ``num-cores``); ``"cuda"`` uses sm_80.
    out_dir : str or os.PathLike
        Where the artifact directory goes (replaced atomically if it already is an artifact).
    tune, trials : bool, int
        MetaSchedule tuning (CPU): ``trials`` measured candidates in all, over the kernels the
        database does not know yet. Our rules' schedules seed the database and the faster
        record wins per kernel, so tuning never makes a kernel slower than untuned (as
        measured). See :mod:`.tuning`.
    tuning_dir : str or os.PathLike, optional
        The tuning database (kept and reused: a second compile with it runs no new trials).
        Default ``$GRAPHPRUNE_TUNING_DIR`` or ``~/.cache/graphprune/tuning``.
    schedule : {"ours", "stock", "dlight"}
        CPU scheduling: our rules (default), none (TVM's stock pipeline), or dlight's CPU rules.
    progress : callable(str), optional
        Called with a short message at each stage.
    kernels : {"dense", "auto", "csr", "bsr", "nm"}
        Sparse Linear kernels (CPU): ``"auto"`` measures dense and each format the weight fits
        per layer and keeps the fastest (decisions cached on disk, recorded in the manifest);
        a format name forces it where the weight fits. See :mod:`.sparse_rewrite`. For the
        quantized layers of ``graph`` (W8A8): ``"auto"`` measures each as int8 dense, int8
        1×4-block sparse (AVX-512 VNNI, where at most half its blocks hold a nonzero) and fp32
        and keeps the fastest; ``"bsr"`` forces int8 block-sparse where it fits; any other
        value runs them int8 dense. See :mod:`.quant_choice`.
    int8_tolerance : float, optional
        The accuracy budget of the quantized layers: the largest relative output error
        (``||y_int8 - y|| / ||y||``, the layer alone on the calibration data, as
        ``gp.quantize`` measured it and its report lists) a layer may add and still run int8;
        a layer above it runs fp32. ``None`` (default): every W8A8 layer runs int8. A
        quantization without ``calib`` measured no errors: then giving it is a
        ``ConfigError``. The manifest records, per layer (``quant:<weight>``), ``kernel``,
        ``rel_error`` and ``int8_tolerance``.
    graph : PruneGraph, optional
        The model's IR. Where its ``masks`` is non-empty, each layer's sparsity pattern comes
        from its mask (a weight with nonzeros outside its mask is a ``ConfigError``) and layers
        without one stay dense; otherwise sparsity is detected from the weights' zeros. The
        manifest says which: ``"masks": "graph"`` or ``"detected"``. See :mod:`.masks`.

    load : bool
        Load the written artifact and return it (default). ``load=False`` only builds and writes
        it and returns its directory: for a target this machine cannot run (``target="cuda"``
        without a CUDA device, which is refused at once when ``load=True``).

    Returns
    -------
    graphprune.runtime.Artifact, or the artifact's directory (a ``Path``) with ``load=False``

    Examples
    --------
    >>> import torch
    >>> from graphprune import codegen
    >>> m = torch.nn.Linear(8, 4)
    >>> art = codegen.compile(m, (torch.randn(2, 8),), out_dir="/tmp/gp_lin")  # doctest: +SKIP
    >>> art(torch.randn(2, 8)).shape                                          # doctest: +SKIP
    (2, 4)
    """
    from graphprune.runtime import load as load_artifact

    if out_dir is None:
        raise ConfigError("compile needs out_dir: the directory the artifact is written to")
    check_out_dir(out_dir)
    tuning = None
    if tune:
        from graphprune.codegen.tuning import check_tuning_available

        if trials <= 0:
            raise ConfigError("tune=True needs trials > 0 (measured candidates in all)")
        check_tuning_available()
        tuning = {"trials": int(trials), "dir": tuning_dir}
    elif trials:
        raise ConfigError(f"trials={trials} given without tune=True")
    model, graph = _model_and_graph(model_or_onnx, graph)
    step = progress or (lambda msg: None)
    tgt = make_target(target)
    check_device(tgt, load)
    step("lowering to Relax")
    lowered = lower(model, example_inputs, dynamic_shapes)
    if lowered.dims and tuning is not None:
        raise ConfigError(
            f"dynamic_shapes with tune=True: tuning specialises on one batch size; compile "
            f"with tune=False or without dynamic_shapes (dynamic dims {sorted(lowered.dims)})"
        )
    step("bounds-checking index inputs")
    lowered, index_inputs = check_index_inputs(lowered)
    masks = None
    if graph is not None and graph.masks:
        step("applying the graph's sparsity masks")
        lowered, masks = apply_masks(lowered, graph.masks, graph.aliases)
    quant_records: dict = {}
    if graph is not None and graph.quant:
        if lowered.dims:
            raise ConfigError("dynamic_shapes with a quantized graph: the int8 kernels are "
                              "built for one batch size; compile without dynamic_shapes")
        lowered, quant_records = rewrite_quant(lowered, tgt, graph.quant, graph.aliases, step,
                                               kernels, int8_tolerance)  # fmt: skip
    elif int8_tolerance is not None:
        raise ConfigError(f"int8_tolerance={int8_tolerance!r} without a quantized graph: pass "
                          f"gp.quantize's result (or graph= with quantization specs)")  # fmt: skip
    lowered, sparse_records = rewrite_sparse(
        lowered, tgt, kernels=kernels, progress=step, masks=masks
    )
    built = build(lowered, tgt, schedule=schedule, progress=step, tuning=tuning)
    step(f"writing artifact {os.fspath(out_dir)}")
    info = {
        "target": target_to_dict(tgt),
        "frontend": lowered.frontend,
        "schedule": schedule,
        "inputs": [s.to_json() for s in lowered.inputs],
        "outputs": [s.to_json() for s in lowered.outputs],
        "masks": "graph" if masks is not None else "detected",
        "kernels": {**built.kernels, **sparse_records, **quant_records},
    }
    if lowered.dims:
        info["dynamic_dims"] = {k: list(v) for k, v in lowered.dims.items()}
    if index_inputs:
        info["index_inputs"] = index_inputs
    if built.tuning is not None:
        info["tuning"] = built.tuning
    if built.padded_channels:  # kernels run these widths; the model's MACs are unchanged
        info["padded_channels"] = built.padded_channels
    path = write_artifact(Path(out_dir), built.executable, built.weights, info)
    return load_artifact(path) if load else path


def _model_and_graph(model_or_result, graph):
    """``(model, graph or None)`` from ``compile``'s first argument and ``graph=``.

    A result is any object with ``.model`` and a ``.graph`` that is a :class:`PruneGraph` (or
    ``None``): a model may have a ``.model`` and a ``.graph`` of another kind (an fx
    ``GraphModule`` of a Hugging Face model has both), and is compiled as a model."""
    carried = getattr(model_or_result, "graph", False)
    if hasattr(model_or_result, "model") and (carried is None or isinstance(carried, PruneGraph)):
        if graph is not None and carried is not None and graph is not carried:
            raise ConfigError(
                "compile was given a result carrying a graph and another graph= : pass one"
            )
        # a gp.quantize result: its model fake-quantizes inputs in hooks; codegen compiles the
        # float model (weights on the int8 grid) and quantizes inputs in its own kernels
        float_model = getattr(model_or_result, "float_model", None)
        model = float_model() if callable(float_model) else model_or_result.model
        model_or_result, graph = model, graph if graph is not None else carried
    if graph is not None and not isinstance(graph, PruneGraph):
        raise TypeError(f"graph= takes a graphprune.ir.PruneGraph, not {type(graph).__name__}")
    return model_or_result, graph
