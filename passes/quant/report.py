"""What ``graphprune.quantize`` did, layer by layer: :class:`QuantReport`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerQuant:
    """One quantized layer: its weight's scales (range), its input scale and the error it adds.

    ``rel_error`` is ``||y_q - y|| / ||y||`` for the layer alone (``y = x W^T`` on calibration
    rows of its float input, ``y_q`` with the weight and, for W8A8, the input fake-quantized);
    ``None`` when no calibration rows reached the layer.
    """

    layer: str
    param: str
    scheme: str
    channels: int
    scale_min: float
    scale_max: float
    act_scale: float | None = None
    rel_error: float | None = None
    smoothed: bool = False


@dataclass
class QuantReport:
    scheme: str
    layers: list[LayerQuant] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # layer -> why left in float
    smoothed: dict[str, list[str]] = field(default_factory=dict)  # norm -> linear weights
    not_smoothed: dict[str, str] = field(default_factory=dict)  # norm -> why not
    notes: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float | None:
        errs = [lq.rel_error for lq in self.layers if lq.rel_error is not None]
        return max(errs) if errs else None

    def to_text(self) -> str:
        lines = [f"quantization: {self.scheme}, {len(self.layers)} layers"
                 + (f", {len(self.smoothed)} norms smoothed" if self.smoothed else "")]
        lines.append(f"{'layer':48s} {'channels':>8s} {'w scale min..max':>21s} "
                     f"{'act scale':>10s} {'rel err':>8s}")
        for lq in self.layers:
            act = "-" if lq.act_scale is None else f"{lq.act_scale:.3g}"
            err = "-" if lq.rel_error is None else f"{lq.rel_error:.4f}"
            lines.append(f"{lq.layer[:48]:48s} {lq.channels:8d} "
                         f"{lq.scale_min:9.3g}..{lq.scale_max:<10.3g} {act:>10s} {err:>8s}")
        lines += [f"excluded {k}: {v}" for k, v in self.excluded.items()]
        lines += [f"not smoothed {k}: {v}" for k, v in self.not_smoothed.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
