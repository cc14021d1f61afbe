"""Small helpers shared by tests (no fixtures with state)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging

import numpy as np
import onnx
import torch

from graphprune.ir import PruneGraph


def export_onnx(model: torch.nn.Module, inputs: tuple) -> onnx.ModelProto:
    """torch.onnx.export through dynamo, quietly."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto


def fingerprint(pg: PruneGraph) -> tuple:
    """Everything a pass must leave alone: nodes, payloads, edges, weights, masks, boundary."""

    def digest(arrs: dict) -> dict:
        def sha(a: np.ndarray) -> str:
            return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

        return {k: (a.shape, str(a.dtype), sha(a)) for k, a in arrs.items()}

    return pg.to_json(), digest(pg.weights), digest(pg.masks), tuple(pg.inputs), tuple(pg.outputs)
