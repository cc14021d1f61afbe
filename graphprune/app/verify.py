"""The pipeline's verify step: the compiled artifact against the model it was compiled from.

Runs after compile, before anything is written into the artifact directory, so a failed check
(``verify.enabled``) leaves no artifact. Both models run on the recipe's example inputs: the
torch module eagerly, an ONNX model in onnxruntime. The rows compare every output (max |diff|,
relative L2, and top-1 agreement for ``(batch, classes)`` logits) with the pruned model and, for
information, with the unpruned source.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphprune.frontends import kind_of
from graphprune.ir.errors import VerificationError

__all__ = ["compare_outputs", "run_source", "verify_artifact"]


def run_source(model: Any, inputs: tuple) -> list[np.ndarray]:
    """Outputs of a torch module or an ONNX model (onnxruntime) as numpy arrays."""
    if kind_of(model) == "onnx":
        from graphprune.frontends.onnx.session import run_onnx

        return run_onnx(model, inputs)
    import torch

    from graphprune.frontends.torch.outputs import flatten_outputs

    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in flatten_outputs(model(*inputs))]


def compare_outputs(got: list, ref: list) -> list[dict]:
    """One row per output pair: its shape and how far ``got`` is from ``ref``."""
    rows = []
    for i, (a, b) in enumerate(zip(got, ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        row = {"output": i, "shape": list(b.shape)}
        if a.shape != b.shape:
            row["error"] = f"shape {list(a.shape)} != {list(b.shape)}"
        else:
            d = np.abs(a - b)
            row["max_abs_diff"] = float(d.max()) if d.size else 0.0
            row["rel_l2"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            if b.ndim == 2 and b.shape[1] > 1:
                row["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
        rows.append(row)
    return rows


def verify_artifact(art: Any, model: Any, source: Any, inputs: tuple, settings: dict) -> dict:
    """Compare ``art``'s outputs with ``model``'s (and ``source``'s) on ``inputs``.

    ``settings`` is the recipe's ``verify:`` section (``atol``, ``rtol``, ``enabled``). Returns
    the summary's ``verify`` entry; raises :class:`VerificationError` when an output is off
    and checking is enabled, or when the output counts differ.
    """
    y = art(*inputs)
    got = list(y) if isinstance(y, tuple) else [y]
    ref = run_source(model, inputs)
    atol, rtol = settings["atol"], settings["rtol"]
    verify = {"atol": atol, "rtol": rtol, "enabled": settings["enabled"]}
    if len(got) != len(ref):
        raise VerificationError(f"the artifact returns {len(got)} outputs, the model "
                                f"{len(ref)}")  # fmt: skip
    verify["vs_compiled_model"] = compare_outputs(got, ref)
    verify["vs_source_model"] = compare_outputs(got, run_source(source, inputs))
    fails = [
        r for r, a, b in zip(verify["vs_compiled_model"], got, ref)
        if "error" in r or not np.allclose(a, b, atol=atol, rtol=rtol)
    ]  # fmt: skip
    verify["passed"] = not fails
    if fails and settings["enabled"]:
        worst = max(fails, key=lambda r: r.get("max_abs_diff", float("inf")))
        raise VerificationError(
            f"verify: artifact output {worst['output']} differs from the pruned model by "
            f"max |diff| {worst.get('max_abs_diff', worst.get('error'))} > atol {atol} "
            f"(rtol {rtol}); no artifact was written. Raise verify.atol or report a codegen bug"
        )
    return verify
