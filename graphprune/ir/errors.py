"""One exception hierarchy for graphprune.

Every failure a user can cause (bad model, bad file, bad config) surfaces as a subclass of
:class:`GraphPruneError` whose message names the node, parameter or file at fault and says what to
do. Third-party exceptions are caught at the boundary and re-raised as ours ``from e``.
"""

from __future__ import annotations


class GraphPruneError(Exception):
    """Root of every error graphprune raises on purpose."""


class CaptureError(GraphPruneError):
    """The model or file could not be turned into a PruneGraph."""


class UnsupportedOpError(GraphPruneError):
    """An op the coupling table or a writer does not know was asked to change."""


class CouplingError(GraphPruneError):
    """Dependency analysis found an inconsistency it cannot resolve."""


class VerificationError(GraphPruneError):
    """A graph or a pruned model failed a structural or numerical check."""


class PassError(GraphPruneError):
    """A pass failed; carries the pass name and the passes that ran before it."""

    def __init__(self, pass_name: str, prior_passes: list[str], message: str):
        self.pass_name = pass_name
        self.prior_passes = list(prior_passes)
        prior = ", ".join(self.prior_passes) or "none"
        super().__init__(f"pass {pass_name!r} failed (after: {prior}): {message}")


class CodegenUnsupported(GraphPruneError):
    """Codegen has no emitter for an (op kind, pattern) combination."""


class ArtifactError(GraphPruneError):
    """A compiled artifact is missing, tampered with, truncated or inconsistent."""


class ConfigError(GraphPruneError):
    """A user-supplied option or recipe is invalid."""
