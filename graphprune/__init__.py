"""graphprune: a pruning compiler for neural networks.

capture (torch.export / ONNX) → dependency groups → pruning passes → write-back / TVM codegen.
"""

from graphprune.api import capture, explain
from graphprune.errors import (
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
from graphprune.prune import PruneReport, PruneResult, prune
from graphprune.remove import remove_channels

__version__ = "0.1.0"

__all__ = [
    "capture", "explain", "remove_channels", "prune", "PruneResult", "PruneReport", "PruneGraph", "OpNode", "Value",
    "GraphPruneError", "CaptureError", "UnsupportedOpError", "CouplingError", "VerificationError",
    "PassError", "CodegenUnsupported", "ArtifactError", "ConfigError",
]  # fmt: skip
