"""``summary.json``: what a pipeline run did, per layer and in total, as plain JSON.

Built from the prune and sparsify reports, the captured graph (to attribute MACs to layers), the
artifact's manifest (kernels chosen) and the verify rows. Deterministic: a replay of the same
recipe writes the same bytes. Read by :mod:`graphprune.app.report` and ``graphprune run``'s
summary lines.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["summarise"]


def _prune_layers(prune_report: Any, graph: Any) -> dict[str, dict]:
    """Rows of the pruned weights (2-D and up): shapes, channels, parameters and MACs."""
    layers: dict[str, dict] = {}
    for r in prune_report.layers:
        if len(r.before) < 2:
            continue
        layers[r.param] = {
            "param": r.param, "shape_before": list(r.before), "shape_after": list(r.after),
            "channels_before": r.before[0], "channels_after": r.after[0],
            "params_before": int(np.prod(r.before)), "params_after": int(np.prod(r.after)),
        }  # fmt: skip
    op_param = {}
    if graph is not None:
        for o, _, _ in prune_report.macs_per_op:
            for v in graph.op_inputs(o):
                if v is None or graph.is_op(v):
                    continue
                val = graph.value(v)
                if val.param and len(val.shape or ()) >= 2:
                    op_param[o] = val.param
                    break
    for o, b, a in prune_report.macs_per_op:
        name = op_param.get(o)
        if name in layers:
            layers[name]["macs_before"] = layers[name].get("macs_before", 0) + int(b)
            layers[name]["macs_after"] = layers[name].get("macs_after", 0) + int(a)
    return layers


def _add_sparsity(layers: dict[str, dict], sp_report: Any) -> None:
    for ls in sp_report.layers:
        row = layers.setdefault(ls.name, {"param": ls.name, "shape_after": list(ls.shape),
                                          "params_after": int(np.prod(ls.shape))})  # fmt: skip
        row["sparsity"] = round(1 - ls.kept / max(ls.total, 1), 6)
        row["pattern"] = str(sp_report.pattern)
    for name, why in sp_report.excluded.items():
        key = name if name in layers else f"{name}.weight"
        if key in layers:
            layers[key]["sparsity_note"] = why


def summarise(prune_report: Any, sp_report: Any, graph: Any, manifest: dict, verify: dict) -> dict:
    """Per-layer rows and totals, JSON-ready (read by :mod:`graphprune.app.report`).

    ``prune_report`` / ``sp_report`` are ``None`` for steps the recipe skipped; ``graph`` is the
    capture the pruning ran on (``None`` without pruning).
    """
    layers = _prune_layers(prune_report, graph) if prune_report is not None else {}
    if sp_report is not None:
        _add_sparsity(layers, sp_report)
    totals = {
        "params_before": prune_report.params_before if prune_report else None,
        "params_after": prune_report.params_after if prune_report else None,
        "macs_before": prune_report.macs_before if prune_report else None,
        "macs_after": prune_report.macs_after if prune_report else None,
    }
    if sp_report is not None:
        kept = sum(ls.kept for ls in sp_report.layers)
        total = sum(ls.total for ls in sp_report.layers)
        totals["sparsified_fraction"] = round(1 - kept / max(total, 1), 6)
    return {
        "prune": None if prune_report is None else {
            "criterion": prune_report.criterion, "scope": prune_report.scope,
            "ratio_used": prune_report.ratio, "form": prune_report.form,
            "groups_pruned": len(prune_report.removed), "groups_frozen": len(prune_report.frozen),
            "notes": list(prune_report.notes),
        },
        "sparsify": None if sp_report is None else {
            "method": sp_report.method, "pattern": str(sp_report.pattern),
            "excluded": dict(sp_report.excluded), "notes": list(sp_report.notes),
        },
        "layers": list(layers.values()),
        "kernels": manifest.get("kernels", {}),
        "totals": totals,
        "verify": verify,
    }  # fmt: skip
