"""What a sparsity pass returns: :class:`MaskSet` (masks, reconstructed weights, report) and its
:class:`SparsityReport` (per layer: achieved sparsity, pattern check, error proxy, time).

A pass only computes: the API records ``MaskSet.masks`` on the IR (``PruneGraph.masks``) and
the frontend's writer (``graphprune.frontends.{torch,onnx}.masks``) writes them into the model.

``rel_error`` is the layer's relative reconstruction error ``||(W - W') X|| / ||W X||`` on up to
512 calibration rows of its own input (``None`` when no calibration data was given).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LayerSparsity", "MaskSet", "SparsityReport", "relative_error"]


@dataclass
class LayerSparsity:
    name: str  # parameter name, e.g. "encoder.layer.0.attention.self.query.weight"
    shape: tuple[int, ...]
    kept: int
    total: int
    pattern_ok: bool
    group: str  # comparison group: "layer", "row", "global", "N:M groups", "column blocks"
    rel_error: float | None
    seconds: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total


@dataclass
class SparsityReport:
    method: str
    pattern: str
    scope: str
    target_sparsity: float
    calibration: str  # how statistics were gathered, e.g. "sequential over encoder.layer (6)"
    layers: list[LayerSparsity] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # module name -> reason
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_sparsity(self) -> float:
        """Sparsity over the pruned layers' weights."""
        total = sum(layer.total for layer in self.layers)
        return 1.0 - sum(layer.kept for layer in self.layers) / total if total else 0.0

    @property
    def pattern_ok(self) -> bool:
        return all(layer.pattern_ok for layer in self.layers)

    def to_text(self) -> str:
        head = (f"sparsify method={self.method} pattern={self.pattern} scope={self.scope} "
                f"target={self.target_sparsity:.3f} calibration={self.calibration} "
                f"time={self.seconds:.2f}s")
        rows = [head, f"{'layer':<52} {'shape':>14} {'sparsity':>8} {'ok':>3} {'rel_err':>8}"
                f" {'group':>13} {'s':>6}"]
        for r in self.layers:
            err = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
            rows.append(f"{r.name:<52} {'x'.join(map(str, r.shape)):>14} {r.sparsity:>8.3f} "
                        f"{'yes' if r.pattern_ok else 'NO':>3} {err:>8} {r.group:>13} "
                        f"{r.seconds:>6.2f}")
        rows.append(f"total sparsity over pruned layers: {self.total_sparsity:.4f}")
        rows += [f"excluded {k}: {v}" for k, v in self.excluded.items()]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    __str__ = to_text


@dataclass
class MaskSet:
    """The product of a sparsity pass.

    ``masks``: parameter (torch) or initializer (ONNX) name -> bool keep-mask in the weight's
    shape, True = kept. ``values``: for the layers whose kept weights the method reconstructed
    (SparseGPT, ``update='obs'``), the new weight, to be written before masking; the other
    layers keep their weights. ``report``: what the pass did, per layer.
    """

    masks: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    report: SparsityReport


def relative_error(w_old: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor | None):
    if x is None:
        return None
    ref = x @ w_old.float().t()
    den = ref.norm().item()
    return (x @ (w_old.float() - w_new.float()).t()).norm().item() / den if den else 0.0
