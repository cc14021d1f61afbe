"""Passes over the IR: analyses (``coupling``, ``cost``) and transforms (``prune``, ``sparsity``).

A pass reads a :class:`~graphprune.ir.PruneGraph` (and what it requires: groups, calibration
data) and returns a result with a report; it never changes its input graph and never writes
another analysis' cached result. Passes import the IR layer and each other, never the frontends'
internals (they run and rewrite models only through ``PruneGraph.source``), codegen or the
application.
"""
