"""The IR layer: the graph every pass reads, its values and ops, removal plans, errors, verifier.

This layer imports nothing of graphprune's above it (frontends, passes, codegen, application).
Frontends build a :class:`PruneGraph`; passes analyse it and return plans and masks; writers in
the frontends apply them. :class:`Source` is the protocol a frontend's capture object fulfils,
so that passes can run, read and rewrite the captured model without knowing which frontend made
it.
"""

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
from graphprune.ir.graph import OP_KINDS, OpNode, PruneGraph, Value
from graphprune.ir.plan import RemovalPlan, slice_array
from graphprune.ir.verify import verify

__all__ = [
    "OP_KINDS", "OpNode", "PruneGraph", "Value", "RemovalPlan", "slice_array", "verify",
    "ArtifactError", "CaptureError", "CodegenUnsupported", "ConfigError", "CouplingError",
    "GraphPruneError", "PassError", "UnsupportedOpError", "VerificationError",
]  # fmt: skip
