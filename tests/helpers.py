"""Small helpers shared by tests (no fixtures with state)."""

from __future__ import annotations

import contextlib
import io
import logging

import onnx
import torch


def export_onnx(model: torch.nn.Module, inputs: tuple) -> onnx.ModelProto:
    """torch.onnx.export through dynamo, quietly."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto
