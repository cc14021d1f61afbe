"""graphprune: a pruning compiler for neural networks.

capture (torch.export / ONNX) → dependency groups → pruning passes → write-back / TVM codegen.

This module is the public facade, the top of the layer stack (see the README's "Layout"): it
re-exports the API (:mod:`graphprune.api`), codegen's ``compile``, the runtime's ``load`` and the
application's ``run``. Nothing inside the package imports it.
"""

from graphprune.api.graph import capture, explain, groups
from graphprune.ir.errors import (
    ArtifactError,
    CaptureError,
    CodegenUnsupported,
    ConfigError,
    CouplingError,
    GraphPruneError,
    PassError,
    UnsupportedOpError,
    VerificationError,
)
from graphprune.ir import OpNode, PruneGraph, Value
from graphprune.api.structured import PruneReport, PruneResult, prune
from graphprune.api.remove import remove_channels
from graphprune.api.sparsify import sparsify
from graphprune.api.quantize import QuantizeResult, quantize
from graphprune.api.checkpoint import CheckpointResult, sparsify_checkpoint
from graphprune.api.prune_checkpoint import PruneCheckpointResult, prune_checkpoint
from graphprune.api.iterative import prune_iteratively, rewind, sensitivity
from graphprune.api.pretrained import from_pretrained
from graphprune.api.recover import RecoverResult, recover

__version__ = "0.1.0"


def compile(*args, **kwargs):  # noqa: A001 - the compile step is the product's verb
    """Lower a model to a TVM artifact; see :func:`graphprune.codegen.compiler.compile`."""
    from graphprune.codegen.compiler import compile as _compile

    return _compile(*args, **kwargs)


def run(recipe, **kwargs):
    """Run a recipe end to end (prune → sparsify → compile → verify → report); see
    :func:`graphprune.app.pipeline.run`."""
    from graphprune.app.pipeline import run as _run

    return _run(recipe, **kwargs)


def prune_exported(ep, example_inputs=None, **prune_kwargs):
    """Prune a ``torch.export.ExportedProgram``; see :func:`graphprune.api.integration.prune_exported`."""
    from graphprune.api.integration import prune_exported as _prune_exported

    return _prune_exported(ep, example_inputs, **prune_kwargs)


def load(path):
    """Load a compiled artifact (hashes verified); see :func:`graphprune.runtime.load`."""
    from graphprune.runtime import load as _load

    return _load(path)

__all__ = [
    "capture", "explain", "groups", "sparsify", "quantize", "QuantizeResult", "sparsify_checkpoint", "CheckpointResult", "prune_checkpoint", "PruneCheckpointResult", "recover", "RecoverResult", "prune_iteratively", "rewind", "sensitivity", "compile", "load", "run", "prune_exported", "remove_channels", "prune", "PruneResult", "PruneReport", "PruneGraph", "OpNode", "Value",
    "GraphPruneError", "CaptureError", "UnsupportedOpError", "CouplingError", "VerificationError",
    "PassError", "CodegenUnsupported", "ArtifactError", "ConfigError",
]  # fmt: skip
