"""Frontends: turn a source model into the IR and apply the passes' results back to it.

One subpackage per source format (``torch``, ``onnx``). Each captures a model into a
:class:`~graphprune.ir.PruneGraph` and attaches a :class:`~graphprune.ir.Source` that runs the
model, maps its nodes to IR values and writes removal plans and masks back. Only this layer looks
at what type a model is. Imports the IR layer only.
"""
