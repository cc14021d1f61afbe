"""Shared by the ONNX frontend tests: the three export forms and group signatures."""

from __future__ import annotations

import contextlib
import io
import logging
import os

import torch

import graphprune as gp

FORMS = ("legacy", "legacy_dyn", "dynamo")


def export(model: torch.nn.Module, inputs: tuple, path: str, form: str) -> str:
    """Export ``model`` as ``form``: the legacy exporter (static, or with a dynamic batch named
    ``batch``) or the dynamo exporter. Returns ``path``."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    names = [f"input_{i}" for i in range(len(inputs))]
    kw: dict = {"input_names": names}
    if form == "dynamo":
        kw["dynamo"] = True
    else:
        kw.update(dynamo=False, opset_version=17)
        if form == "legacy_dyn":
            kw["dynamic_axes"] = {n: {0: "batch"} for n in names}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, tuple(inputs), os.fspath(path), **kw)
    return os.fspath(path)


def with_attention_mask(model, inputs):
    """A :class:`graphprune.models.hf.TensorOutputs` decoder taking an ``attention_mask`` of
    ones too, as deployed exports do: without one, transformers' mask code calls ``aten::diff``
    (its packed-sequence check), which the legacy exporter cannot write."""
    from graphprune.models.hf import TensorOutputs

    names = tuple(model.input_names) + ("attention_mask",)
    wrapped = TensorOutputs(model.model, names, model.output_names).eval()
    return wrapped, tuple(inputs) + (torch.ones_like(inputs[0]),)


def signatures(pg) -> list[tuple]:
    """Each prunable group as (size, sorted shapes of its matrix/kernel parameters), shapes
    sorted too: the legacy exporter folds BatchNorm into Conv and both exporters transpose
    Linear weights into MatMul, so names and layouts differ between frontends, sizes do not."""
    def is_weight(v: str) -> bool:  # read by a conv/linear/matmul, not added (a class token)
        return len(pg.value(v).shape) >= 2 and any(
            pg.op(o).kind in WEIGHT_KINDS for o, _ in pg.consumers(v))

    out = []
    for g in gp.groups(pg):
        if not g.prunable:
            continue
        shapes = sorted({tuple(sorted(pg.value(m.value).shape)) for m in g.members
                         if m.param and is_weight(m.value)})  # fmt: skip
        out.append((g.size, tuple(shapes)))
    return sorted(out)


WEIGHT_KINDS = {"conv", "conv_transpose", "linear", "matmul"}
