"""Sparsity passes: unstructured, N:M and block masks with their criteria, calibration,
refinements and gradual schedules.

Two passes compute masks and write nothing:
:func:`~graphprune.passes.sparsity.sparsify.compute_masks` on a torch module (module-based
calibration, layer by layer for transformer stacks; with ``inplace`` it calibrates the module
itself, without a copy, and writes only reconstructed weights, SparseGPT's) and
:func:`~graphprune.passes.sparsity.weight_arrays.compute_array_masks` on weight arrays (ONNX
initializers, data-free). Both take a config checked by
:func:`~graphprune.passes.sparsity.config.validate_config` and return a
:class:`~graphprune.passes.sparsity.report.MaskSet`. ``graphprune.sparsify``
(:mod:`graphprune.api.sparsify`) records the masks on the IR (``PruneGraph.masks``) and the
frontends write them back. Imports the IR layer and ``graphprune.passes`` siblings only.
"""
