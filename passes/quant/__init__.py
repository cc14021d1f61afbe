"""Quantization passes: INT8 weight scales, activation observers, SmoothQuant scale migration and
the per-layer error report.

Runs after pruning and sparsity (masks are kept: symmetric quantization maps 0 to 0) and before
codegen. :func:`~graphprune.passes.quant.config.validate_quant_config` checks the options;
:mod:`~graphprune.passes.quant.observers` collects activation statistics (min-max, percentile; the
``mse`` observer picks among their ranges by the layer's output error)
from numpy row blocks a frontend feeds it (forward hooks for torch, extra graph outputs for ONNX);
:mod:`~graphprune.passes.quant.smooth` finds the norm -> linears pairs SmoothQuant may migrate
scales across (from the IR's coupling: the norm's output feeds only linears) and computes the
migration; :mod:`~graphprune.passes.quant.specs` turns weights and observations into
:class:`~graphprune.ir.quant.QuantSpec` records and the
:class:`~graphprune.passes.quant.report.QuantReport`.
Nothing here writes a model: ``graphprune.quantize`` records the specs in ``PruneGraph.quant`` and
the frontends write the fake-quantized torch module or the QDQ ONNX model.
"""
