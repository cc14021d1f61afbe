"""The public path of graphprune's exceptions; they are defined in :mod:`graphprune.ir.errors`."""

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

__all__ = [
    "ArtifactError", "CaptureError", "CodegenUnsupported", "ConfigError", "CouplingError",
    "GraphPruneError", "PassError", "UnsupportedOpError", "VerificationError",
]  # fmt: skip
