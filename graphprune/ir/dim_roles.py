"""Dimension roles of parameters (``Value.dim_roles``), named after the first op reading them.

Run by every frontend at the end of capture, so reports and criteria can say "out_channels"
rather than "axis 0".
"""

from __future__ import annotations

from graphprune.ir.graph import PruneGraph


# Dimension roles of parameters, by the op kind that reads them and the slot they sit in.
_ROLES = {
    ("conv", 1): ("out_channels", "in_channels_per_group", "kernel", "kernel", "kernel"),
    ("conv", 2): ("out_channels",),
    ("conv_transpose", 1): ("in_channels", "out_channels_per_group", "kernel", "kernel", "kernel"),
    ("conv_transpose", 2): ("out_channels",),
    ("embedding", 0): ("vocabulary", "features"),
    ("batch_norm", 1): ("channels",), ("batch_norm", 2): ("channels",),
    ("batch_norm", 3): ("channels",), ("batch_norm", 4): ("channels",),
    ("group_norm", 2): ("channels",), ("group_norm", 3): ("channels",),
}


def annotate_dim_roles(pg: PruneGraph) -> None:
    """Name each parameter dimension after the first op that reads it (``Value.dim_roles``)."""
    for o in pg.ops():
        op = pg.op(o)
        for slot, v in enumerate(pg.op_inputs(o)):
            if v is None or pg.value(v).role != "param" or pg.value(v).dim_roles:
                continue
            rank = len(pg.value(v).shape or ())
            roles = _ROLES.get((op.kind, slot))
            if op.kind == "linear":
                xs, ws, bs = op.attrs.get("slots", (0, 1, 2))
                oi = op.attrs.get("w_layout", "oi") == "oi"
                if slot == ws:
                    roles = ("out_features", "in_features") if oi else ("in_features", "out_features")
                elif slot == bs:
                    roles = ("out_features",)
            elif op.kind in ("layer_norm", "instance_norm") and slot > 0:
                roles = ("features",) * rank
            if roles is None:
                roles = ("data",) * rank
            pg.value(v).dim_roles = tuple(roles[:rank]) + ("data",) * max(0, rank - len(roles))


