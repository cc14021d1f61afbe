"""``compile``: torch module or ONNX model in, loaded :class:`~graphprune.runtime.Artifact` out.

Chains the codegen steps: :mod:`.frontend` (lower to Relax) → :mod:`.pipeline` (optimise,
schedule, build) → :mod:`.artifact` (write atomically) → :func:`graphprune.runtime.load`
(verify and open). Codegen reads only the model it is given: pruning must already be applied
(``remove_channels`` / write-back), so a structurally pruned model compiles like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from graphprune.codegen.artifact import write_artifact
from graphprune.codegen.lower import lower
from graphprune.codegen.build import build
from graphprune.codegen.target import make_target, target_to_dict
from graphprune.ir.errors import ConfigError

__all__ = ["compile"]


def compile(  # noqa: A001 - the public name the issue asks for
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
):
    """Compile a model to a TVM artifact directory and return it loaded.

    Parameters
    ----------
    model_or_onnx : torch.nn.Module, onnx.ModelProto, str or os.PathLike
        A torch module (exported with ``torch.export``) or an ONNX model / ``.onnx`` path.
    example_inputs : tuple of tensors or arrays, optional
        Required for torch; for ONNX only needed when an input has dynamic dims. Shapes are
        baked in: the artifact accepts exactly these shapes and dtypes.
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
        a format name forces it where the weight fits. See :mod:`.sparse_rewrite`.

    Returns
    -------
    graphprune.runtime.Artifact

    Examples
    --------
    >>> import torch
    >>> from graphprune import codegen
    >>> m = torch.nn.Linear(8, 4)
    >>> art = codegen.compile(m, (torch.randn(2, 8),), out_dir="/tmp/gp_lin")  # doctest: +SKIP
    >>> art(torch.randn(2, 8)).shape                                          # doctest: +SKIP
    (2, 4)
    """
    from graphprune.runtime import load

    if out_dir is None:
        raise ConfigError("compile needs out_dir: the directory the artifact is written to")
    tuning = None
    if tune:
        from graphprune.codegen.tuning import check_tuning_available

        if trials <= 0:
            raise ConfigError("tune=True needs trials > 0 (measured candidates in all)")
        check_tuning_available()
        tuning = {"trials": int(trials), "dir": tuning_dir}
    elif trials:
        raise ConfigError(f"trials={trials} given without tune=True")
    step = progress or (lambda msg: None)
    tgt = make_target(target)
    step("lowering to Relax")
    lowered = lower(model_or_onnx, example_inputs)
    # -- sparse kernels (issue 6): rewrite sparse Linears before build; records go to manifest --
    from graphprune.codegen.sparse_rewrite import rewrite_sparse

    lowered, sparse_records = rewrite_sparse(lowered, tgt, kernels=kernels, progress=step)
    # -- end sparse kernels --
    built = build(lowered, tgt, schedule=schedule, progress=step, tuning=tuning)
    step(f"writing artifact {os.fspath(out_dir)}")
    info = {
        "target": target_to_dict(tgt),
        "frontend": lowered.frontend,
        "schedule": schedule,
        "inputs": [s.to_json() for s in lowered.inputs],
        "outputs": [s.to_json() for s in lowered.outputs],
        "kernels": {**built.kernels, **sparse_records},
    }
    if built.tuning is not None:
        info["tuning"] = built.tuning
    if built.padded_channels:  # kernels run these widths; the model's MACs are unchanged
        info["padded_channels"] = built.padded_channels
    path = write_artifact(Path(out_dir), built.executable, built.weights, info)
    return load(path)
