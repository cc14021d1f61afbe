"""The dead-channel oracle every structural test (and a cautious user) can run.

Make a group's channels provably dead — zero every parameter slice the group touches, producers
and consumers alike, so the channel is 0 wherever it flows — then remove that group physically
and check that the smaller model computes what the original computes.

Groups whose index space is *reduced* without weights (LayerNorm/RMSNorm statistics, ``mean``)
are not exact under removal: there the reference masks those reductions to the kept positions
(statistics over the surviving channels only), which is what the pruned model computes.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.frontends.torch.nodes import aten_name, get_tensor
from graphprune.frontends.torch.outputs import flatten_outputs
from graphprune.ir.errors import UnsupportedOpError
from graphprune.testing.common import OracleResult, choose_indices, choose_removal, dead_positions
from graphprune.ir import PruneGraph
from graphprune.ir.plan import RemovalPlan
from graphprune.passes.prune.plan import plan_removal
from graphprune.passes.coupling import build_coupling


def _flat(out: Any) -> list[np.ndarray]:
    return [t.detach().float().numpy() for t in flatten_outputs(out)]


def _masked_mean_like(fn_name: str):
    def f(x: torch.Tensor, dims: Any, keep: dict[int, torch.Tensor], *rest: Any, **kw: Any):
        for ax, idx in keep.items():
            x = x.index_select(ax, idx)
        return getattr(torch.ops.aten, fn_name)(x, dims, *rest, **kw)

    return f


def _masked_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *rest, keep=()):
    idx = torch.tensor(keep, dtype=torch.long)
    y = torch.zeros_like(x)
    w = weight.index_select(-1, idx) if weight is not None else None
    b = bias.index_select(-1, idx) if bias is not None else None
    y[..., idx] = F.layer_norm(x.index_select(-1, idx), (len(idx),), w, b, eps)
    return y


def _masked_reduce(x, *args, _keep=None, _fn="", **kw):
    for ax, idx in (_keep or {}).items():
        x = x.index_select(ax, torch.tensor(idx, dtype=torch.long))
    packet, overload = _fn.split(".")[1:3]
    return getattr(getattr(torch.ops.aten, packet), overload)(x, *args, **kw)


def _masked_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *rest, keep=(),
                       new_groups=1):  # fmt: skip
    idx = torch.tensor(keep, dtype=torch.long)
    y = torch.zeros_like(x)
    w = weight.index_select(0, idx) if weight is not None else None
    b = bias.index_select(0, idx) if bias is not None else None
    y[:, idx] = F.group_norm(x.index_select(1, idx), new_groups, w, b, eps)
    return y


def _mask_reductions(gm: torch.fx.GraphModule, pg: PruneGraph, plan: RemovalPlan,
                     gids: list[int]) -> None:  # fmt: skip
    ops = {note.split(":")[0] for g in gids for note in plan.coupling.groups[g].reductions}
    nodes = {n.name: n for n in gm.graph.nodes}
    vid = pg.source.value_ids(gm)
    for op in ops:
        n = nodes.get(op)
        if n is None:
            raise UnsupportedOpError(f"oracle: reduction node {op!r} not found")
        x = n.args[0]
        xv = vid[x.name]
        rank = len(pg.value(xv).shape)
        name = aten_name(n.target)
        if name in ("mean", "sum", "var", "std", "amax", "amin"):
            keep = {a: plan.kept(xv, a).tolist() for a in range(rank)
                    if plan.kept(xv, a) is not None and a in pg.op(op).attrs["axes"]}  # fmt: skip
            n.kwargs = {**n.kwargs, "_keep": keep, "_fn": str(n.target)}
            n.target = _masked_reduce
        elif name == "group_norm":
            keep = plan.kept(xv, 1)
            n.target = _masked_group_norm
            n.kwargs = {**n.kwargs, "keep": keep.tolist(), "new_groups": plan.op_size(op, "groups")}
        elif name == "layer_norm" and len(n.args[1]) == 1:
            k = plan.kept(xv, rank - 1)
            n.target = _masked_layer_norm
            n.kwargs = {**n.kwargs, "keep": k.tolist()}
        else:
            raise UnsupportedOpError(f"oracle cannot mask reduction {name} at {op!r}")
    gm.recompile()


def inputs_at(pg: PruneGraph, sizes: dict[str, int], seed: int = 0) -> tuple[tuple, dict]:
    """Inputs like the example ones with each dynamic dim set from ``sizes`` (by name, see
    ``pg.dynamic_axes``), as ``(args, kwargs)``. Floats are random normal; integer inputs are
    random within the example's values (token ids), or all ones where the example holds only 0
    and 1 (an attention mask: no fully masked rows)."""
    import torch.utils._pytree as pytree

    g = torch.Generator().manual_seed(seed)
    leaves, spec = pytree.tree_flatten((pg.source.args, pg.source.kwargs))
    names = iter(pg.inputs)
    out = []
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        shape = pg.shape_at(next(names), sizes)
        if t.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=t.dtype))
        elif t.numel() and int(t.min()) >= 0 and int(t.max()) <= 1:
            out.append(torch.ones(shape, dtype=t.dtype))
        else:
            lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
            out.append(torch.randint(lo, hi + 1, shape, generator=g).to(t.dtype))
    return pytree.tree_unflatten(out, spec)


def run_oracle(pg: PruneGraph, gid: int | dict[int, Iterable[int]],
               indices: Iterable[int] | None = None, seed: int = 0,
               shapes: Iterable[dict[str, int]] = (),
               inputs: Iterable[tuple[tuple, dict]] = ()) -> OracleResult:  # fmt: skip
    """Kill the chosen indices in a copy of the model, prune them, compare outputs.

    ``gid`` is one group id (``indices`` default to a random half of it) or a dict
    ``{group id: indices}`` to remove several groups at once. Outputs are compared on the
    example inputs and, for a graph with dynamic axes, also at each of ``shapes`` (dim name ->
    size, inputs from :func:`inputs_at`) and on each ``(args, kwargs)`` of ``inputs``; the
    result's ``reference``/``pruned`` hold every output at every shape, in that order.
    """
    if pg.frontend != "torch":
        from graphprune.testing.oracle_onnx import run_oracle_onnx

        return run_oracle_onnx(pg, gid, indices, seed)
    removal = choose_removal(pg, gid, indices, seed)
    plan = plan_removal(pg, removal)
    ref = dead_reference(pg, removal, plan)
    pruned = pg.source.apply_plan(pg, plan)
    r = _flat(pg.source.run(ref))
    p = _flat(pg.source.run(pruned))
    batches = [inputs_at(pg, sz, seed) for sz in shapes] + list(inputs)
    with torch.no_grad():
        for args, kwargs in batches:
            r += _flat(ref(*args, **kwargs))
            p += _flat(pruned(*args, **kwargs))
    diff = max((float(np.abs(a - b).max()) if a.shape == b.shape and a.size else np.inf)
               for a, b in zip(r, p)) if r else 0.0  # fmt: skip
    first = next(iter(removal))
    return OracleResult(first, list(removal[first]), r, p, diff)


def dead_reference(pg: PruneGraph, removal: dict[int, list[int]],
                   plan: RemovalPlan | None = None) -> torch.fx.GraphModule:  # fmt: skip
    """The captured model with ``removal``'s channels made dead (every member slice zeroed) and
    reductions over them masked to the kept channels: what pruning them must compute."""
    plan = plan or plan_removal(pg, removal)
    ref = pg.source.graph_module()
    tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    with torch.no_grad():
        for g in removal:
            for m in build_coupling(pg).groups[g].params:
                t = tensors.get(m.param)
                if t is None:
                    t = get_tensor(ref, m.param)
                dead = dead_positions(plan, m.value, m.axis, t.shape[m.axis])
                if m.param.endswith("running_var"):
                    continue  # zeroing a variance would divide by ~sqrt(eps); the channel is dead
                t.index_fill_(m.axis, torch.from_numpy(dead), 0)
    if any(build_coupling(pg).groups[g].reductions for g in removal):
        _mask_reductions(ref, pg, plan, list(removal))
    return ref


__all__ = ["OracleResult", "choose_indices", "choose_removal", "dead_positions", "dead_reference",
           "get_tensor", "inputs_at", "run_oracle"]
