"""Sparsity passes: unstructured, N:M and block masks with their criteria, calibration,
refinements and gradual schedules. Masks are recorded on the IR (``PruneGraph.masks``) and
written back by the frontends. Imports the IR layer and ``graphprune.passes`` siblings only.
"""
