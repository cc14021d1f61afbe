"""Write a :class:`~passes.removal.RemovalPlan` back to PyTorch: a new, smaller ``GraphModule``.

The module is the unlifted ``ExportedProgram`` of the captured model with every changed
parameter sliced and every shape-carrying argument rewritten (``view`` sizes, ``split`` sizes,
``slice`` bounds, conv ``groups``, LayerNorm ``normalized_shape``, ...) by ``ARG_REWRITES``.
Then every node's shape is checked against the plan on the example inputs: a mismatch raises
:class:`VerificationError` naming the node, never a silently wrong model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from graphprune.frontends.torch.arrays import as_numpy
from graphprune.frontends.torch.dynamic import install_input_check
from graphprune.frontends.torch.nodes import aten_name, get_tensor, replacement, set_tensor
from graphprune.ir.errors import VerificationError
from graphprune.ir import PruneGraph
from graphprune.ir.plan import RemovalPlan, slice_array


class _Ctx:
    def __init__(self, pg: PruneGraph, plan: RemovalPlan, vid: dict[str, str]):
        self.pg, self.plan, self.vid = pg, plan, vid

    def shape(self, n: Any, new: bool = True) -> tuple[int, ...]:
        v = self.vid.get(n.name) if isinstance(n, torch.fx.Node) else n
        if new and v in self.plan.new_shapes:
            return self.plan.new_shapes[v]
        return tuple(self.pg.value(v).shape)

    def out(self, node: torch.fx.Node) -> str:
        return self.vid[node.name]


def _set_arg(node: torch.fx.Node, i: int, name: str, value: Any) -> None:
    if i < len(node.args):
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _get_arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def _sizes(old: Any, new: tuple[int, ...]) -> list[Any]:
    """The new size list of a shape argument: symbolic sizes (fx nodes computing a batch or
    sequence length) and ``-1`` stay as they are, so the module still runs at any size; static
    entries take the planned size (channel axes are always static)."""
    if not isinstance(old, (list, tuple)) or len(old) != len(new):
        return list(new)
    return [o if isinstance(o, torch.fx.Node) or o == -1 else int(w) for o, w in zip(old, new)]


def _rw_reshape(c: _Ctx, n: torch.fx.Node) -> None:
    name = "size" if "view" in str(n.target) else "shape"
    _set_arg(n, 1, name, _sizes(_get_arg(n, 1, name), c.shape(n)))


def _rw_unflatten(c: _Ctx, n: torch.fx.Node) -> None:
    dim = n.args[1] % len(c.shape(n.args[0]))
    _set_arg(n, 2, "sizes", _sizes(n.args[2], c.shape(n)[dim : dim + len(n.args[2])]))


def _rw_expand(c: _Ctx, n: torch.fx.Node) -> None:
    _set_arg(n, 1, "size", _sizes(_get_arg(n, 1, "size"), c.shape(n)))


def _outs(c: _Ctx, n: torch.fx.Node) -> list[str]:
    return c.pg.op_outputs(n.name)


def _rw_split(c: _Ctx, n: torch.fx.Node) -> None:
    axis = c.pg.op(n.name).attrs["axis"]
    if c.plan.kept(c.vid[n.args[0].name], axis) is None:
        return  # not a pruned axis (perhaps a symbolic one): the sizes stand
    sizes = [c.shape(o)[axis] for o in _outs(c, n)]
    if aten_name(n.target) == "split_with_sizes":
        _set_arg(n, 1, "split_sizes", sizes)
    elif aten_name(n.target) == "split":
        _set_arg(n, 1, "split_size", sizes[0])


def _new_pos(c: _Ctx, n: torch.fx.Node, pos: int) -> int:
    x = c.vid[n.args[0].name]
    axis = c.pg.op(n.name).attrs["axis"]
    k = c.plan.kept(x, axis)
    return pos if k is None else int(np.searchsorted(k, pos))


def _rw_slice(c: _Ctx, n: torch.fx.Node) -> None:
    a = c.pg.op(n.name).attrs
    if a.get("step", 1) != 1 or c.plan.kept(c.vid[n.args[0].name], a["axis"]) is None:
        return
    start, end = _new_pos(c, n, a["start"]), _new_pos(c, n, a["end"])
    if aten_name(n.target) == "narrow":
        _set_arg(n, 2, "start", start)
        _set_arg(n, 3, "length", end - start)
    else:
        _set_arg(n, 2, "start", start)
        _set_arg(n, 3, "end", end)


def _rw_groups(c: _Ctx, n: torch.fx.Node) -> None:
    size = c.plan.op_size(n.name, "groups")
    if size is not None:
        _set_arg(n, 6, "groups", size)


def _rw_group_norm(c: _Ctx, n: torch.fx.Node) -> None:
    size = c.plan.op_size(n.name, "groups")
    if size is not None:
        _set_arg(n, 1, "num_groups", size)


def _rw_layer_norm(c: _Ctx, n: torch.fx.Node) -> None:
    k = len(n.args[1])
    _set_arg(n, 1, "normalized_shape", list(c.shape(n.args[0])[-k:]))


def _rw_sdpa(c: _Ctx, n: torch.fx.Node) -> None:
    q = n.args[0]
    e_old, e_new = c.shape(q, new=False)[-1], c.shape(q)[-1]
    if e_old != e_new and _get_arg(n, 6, "scale") is None:
        # The default scale is 1/sqrt(head_dim); keep the original one so scores are unchanged.
        n.kwargs = {**n.kwargs, "scale": 1.0 / math.sqrt(e_old)}


ARG_REWRITES: dict[str, Callable[[_Ctx, torch.fx.Node], None]] = {
    "view": _rw_reshape, "reshape": _rw_reshape, "_unsafe_view": _rw_reshape,
    "unflatten": _rw_unflatten, "expand": _rw_expand,
    "split": _rw_split, "split_with_sizes": _rw_split,
    "slice": _rw_slice, "narrow": _rw_slice,
    "conv1d": _rw_groups, "conv2d": _rw_groups, "conv3d": _rw_groups,
    "conv_transpose1d": _rw_groups, "conv_transpose2d": _rw_groups, "conv_transpose3d": _rw_groups,
    "group_norm": _rw_group_norm, "layer_norm": _rw_layer_norm, "rms_norm": _rw_layer_norm,
    "scaled_dot_product_attention": _rw_sdpa,
}  # fmt: skip


def apply_plan_torch(pg: PruneGraph, plan: RemovalPlan, verify: bool = True,
                     share: bool = False) -> torch.fx.GraphModule:  # fmt: skip
    """A new GraphModule computing ``pg``'s model with the plan's channels removed.

    ``share=True`` leaves the unchanged tensors those of the captured model (the user's) instead
    of copying them: only for a reference that is run and dropped, never for a result."""
    gm = pg.source.graph_module(fresh=not share)
    vid = pg.source.value_ids(gm)
    c = _Ctx(pg, plan, vid)
    for n in list(gm.graph.nodes):  # torch.export lists each name of a tied weight; one is read
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    aliases: dict[int, list[str]] = {}  # a tied tensor is reachable under several names
    for name, t in [*gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False)]:  # fmt: skip
        aliases.setdefault(id(t), []).append(name)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.name in vid and vid[n.name] in plan.new_shapes:
            old = state.get(n.target)
            if old is None:
                old = get_tensor(gm, n.target)
            new = replacement(old, slice_array(as_numpy(old), vid[n.name], plan))
            for target in aliases.get(id(old), [n.target]):
                set_tensor(gm, target, new)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.name in pg.nx:
            rw = ARG_REWRITES.get(aten_name(n.target))
            if rw is not None:
                rw(c, n)
    gm.recompile()
    if verify:
        verify_shapes(pg, plan, gm, c)
    restore_layers(gm)
    install_input_check(gm, pg)
    return gm


def restore_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn ``aten.linear`` / ``aten.conv2d`` calls on a module's own weight back into
    ``nn.Linear`` / ``nn.Conv2d`` submodules, so module-level tools (hooks, sparsify, optimizers
    per layer, printing) see standard layers. Numerics are unchanged: the same parameters run
    the same op."""
    users: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            users[n.target] = users.get(n.target, 0) + len(n.users)
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (torch.ops.aten.linear.default,
                                                        torch.ops.aten.conv2d.default):
            continue
        w, b = n.args[1], (n.args[2] if len(n.args) > 2 else None)
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target.endswith(".weight")):
            continue
        path = w.target[: -len(".weight")]
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"
                                  and b.target == path + ".bias"):  # fmt: skip
            continue
        owner = gm.get_submodule(path)
        names = set(owner._parameters) | set(owner._buffers)
        if list(owner.children()) or names - {"weight", "bias"} or type(owner) is not torch.nn.Module:
            continue
        if users.get(w.target, 0) != 1 or (b is not None and users.get(b.target, 0) != 1):
            continue  # shared (tied) weights stay functional
        weight = owner._parameters.get("weight")
        bias = owner._parameters.get("bias") if b is not None else None
        if not isinstance(weight, torch.nn.Parameter):
            continue
        if n.target is torch.ops.aten.linear.default:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                    device="meta")  # fmt: skip
        else:
            stride, padding, dilation, groups = (list(n.args[3:4]) or [[1, 1]])[0], (
                list(n.args[4:5]) or [[0, 0]])[0], (list(n.args[5:6]) or [[1, 1]])[0], (
                list(n.args[6:7]) or [1])[0]
            if isinstance(padding, str):
                continue
            layer = torch.nn.Conv2d(weight.shape[1] * groups, weight.shape[0],
                                    tuple(weight.shape[2:]), stride=stride, padding=padding,
                                    dilation=dilation, groups=groups, bias=bias is not None,
                                    device="meta")  # fmt: skip
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        *parent, leaf = path.split(".")
        setattr(gm.get_submodule(".".join(parent)) if parent else gm, leaf, layer)
        with gm.graph.inserting_before(n):
            call = gm.graph.call_module(path, (n.args[0],))
        call.meta = dict(n.meta)
        n.replace_all_uses_with(call)
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def verify_shapes(pg: PruneGraph, plan: RemovalPlan, gm: torch.fx.GraphModule, c: _Ctx) -> None:
    """Run ``gm`` on the example inputs and check every node's shape against the plan."""
    args, kwargs = pg.source.args, pg.source.kwargs
    seen: dict[str, tuple[int, ...]] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            try:
                out = super().run_node(n)
            except Exception as e:  # noqa: BLE001
                op = pg.op(n.name).source if n.name in pg.nx else str(n.target)
                raise VerificationError(
                    f"the pruned model fails at node {n.name!r} ({op}): {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300]}. The coupling table or the writer for this "
                    "op is incomplete; freeze the group or report this model."
                ) from e
            if isinstance(out, torch.Tensor) and n.name in c.vid:
                seen[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        Probe(gm).run(*args, *kwargs.values())
    for name, shape in seen.items():
        want = c.shape(c.vid[name])
        if tuple(want) != shape:
            raise VerificationError(
                f"node {name!r} produces shape {list(shape)} after pruning, the plan expects "
                f"{list(want)}: an argument of this op was not rewritten."
            )
