"""Structured pruning passes: criteria and calibration statistics, channel selection
(``PruneChannels``), removal planning (``PlanRemoval``) and depth pruning (``DropBlocks``).

Reads the IR and the coupling analysis; runs the captured model only through the frontend's
:class:`~graphprune.ir.Source`. Imports the IR layer and ``graphprune.passes`` siblings only.
"""
