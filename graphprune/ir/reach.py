"""Which ops stay live when some ops' outputs are replaced by other values (depth pruning)."""

from __future__ import annotations

from graphprune.ir.graph import PruneGraph


def resolve(pg: PruneGraph, replace: dict[str, str], value: str) -> str:
    """``value``, followed through replaced ops (a skip input may itself be a dropped add)."""
    seen = set()
    while (p := pg.producer(value)) in replace and p not in seen:
        seen.add(p)
        value = replace[p]
    return value


def dead_after_bypass(pg: PruneGraph, replace: dict[str, str]) -> set[str]:
    """Op ids that no graph output depends on once each op in ``replace`` is bypassed (its
    output replaced by ``replace[op]``); the replaced ops themselves included."""
    live: set[str] = set()
    stack = [resolve(pg, replace, v) for v in pg.outputs]
    while stack:
        p = pg.producer(stack.pop())
        if p is None or p in live:
            continue
        live.add(p)
        stack.extend(resolve(pg, replace, v) for v in pg.op_inputs(p) if v is not None)
    return set(pg.ops()) - live
