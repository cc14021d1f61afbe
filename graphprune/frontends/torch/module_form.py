"""Write a removal plan back into a copy of the user's ``nn.Module`` (the "module" form).

Parameters and buffers are replaced by their sliced versions and the attributes of the standard
layers updated (``in_channels``, ``out_features``, ``num_features``, ``normalized_shape``,
``groups``, ...). A model whose ``forward`` hard-codes sizes (a reshape to 12 heads) would then
be wrong, so the module form is accepted only when it reproduces the rewritten ``GraphModule`` on
the example inputs; otherwise the caller keeps the GraphModule and says so in the report.
A ``transformers`` model also gets the attributes its forward reads and its config updated
(:mod:`graphprune.frontends.torch.hf`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from graphprune.frontends.torch import hf
from graphprune.frontends.torch.nodes import get_tensor, replacement, set_tensor
from graphprune.frontends.torch.outputs import flatten_outputs
from graphprune.ir import PruneGraph
from graphprune.ir.plan import RemovalPlan, slice_array


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    return (model.get_submodule(".".join(path)) if path else model), leaf


def _groups_of(pg: PruneGraph, plan: RemovalPlan, weight_name: str) -> int | None:
    for p in pg.params():
        if pg.value(p).param != weight_name:
            continue
        for op, _ in pg.consumers(p):
            size = plan.op_size(op, "groups")
            if size is not None:
                return size
    return None


def _update_attrs(model: nn.Module, pg: PruneGraph, plan: RemovalPlan) -> None:
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.modules.conv._ConvNd):
            g = _groups_of(pg, plan, prefix + "weight") or m.groups
            m.groups = g
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * g
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * g
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
            for p in pg.params():
                if pg.value(p).param == prefix + "weight":
                    for op, _ in pg.consumers(p):
                        size = plan.op_size(op, "groups")
                        if size is not None:
                            m.num_groups = size
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)


def _load(model: nn.Module, pg: PruneGraph, plan: RemovalPlan,
          new: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Replace every changed parameter/buffer by its sliced version (or by ``new[name]`` when
    given: tensors an earlier ``_load`` made); returns the tensors put in, by name."""
    done: dict[str, torch.Tensor] = {}
    for v in pg.params():
        val = pg.value(v)
        if v not in plan.new_shapes or val.param in done:
            continue
        if new is not None:
            tensor = new[val.param]
        else:
            old = get_tensor(model, val.param)
            tensor = replacement(old, slice_array(np.asarray(pg.weights[val.param]), v, plan))
        done[val.param] = tensor
        set_tensor(model, val.param, tensor)
    return done


def reference_outputs(reference: nn.Module, pg: PruneGraph) -> list[torch.Tensor]:
    """The rewritten GraphModule's outputs on the example inputs: what the module form must
    reproduce. Computed first so the GraphModule (a pruned copy of every weight) can be freed
    before the module form is built."""
    return list(flatten_outputs(pg.source.run(reference)))


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors: the
    rewrite replaces tensors by assignment, never in place, so the trial costs only the sliced
    tensors it adds (a deep copy would cost the whole model again)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def module_form(model: nn.Module, pg: PruneGraph, plan: RemovalPlan,
                reference: nn.Module | list[torch.Tensor], inplace: bool = False,
                ) -> nn.Module | None:  # fmt: skip
    """The pruned model as (a copy of) the user's module, or None when it cannot be trusted.

    ``reference`` is the rewritten GraphModule or its :func:`reference_outputs`. In place, the
    rewrite is first tried on a copy that shares the user's tensors (so a failure leaves the
    model untouched), then the tensors it made are moved into the user's module: the peak is the
    model plus its pruned weights, not two models."""
    ties = _ties(model)
    target = model if inplace else copy.deepcopy(model)
    trial = _sharing_copy(model) if inplace else target
    try:
        new = _rewrite(trial, pg, plan, ties)
        args, kwargs = pg.source.args, pg.source.kwargs
        was_training = trial.training
        trial.eval()
        with torch.no_grad(), hf.capture_mode(trial):
            got = flatten_outputs(trial(*args, **kwargs))
        trial.train(was_training)
        want = reference if isinstance(reference, list) else reference_outputs(reference, pg)
    except Exception:  # noqa: BLE001 - any failure means "use the GraphModule"
        return None
    if len(got) != len(want) or any(a.shape != b.shape or not torch.allclose(a, b, atol=1e-5,
                                                                             rtol=1e-4)
                                    for a, b in zip(got, want)):  # fmt: skip
        return None
    if inplace:
        del trial
        _rewrite(target, pg, plan, ties, new)
    return target


def _rewrite(model: nn.Module, pg: PruneGraph, plan: RemovalPlan, ties: list[list[str]],
             new: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    done = _load(model, pg, plan, new)
    _apply_ties(model, ties, set(done))
    _update_attrs(model, pg, plan)
    if hf.is_hf(model):  # attributes its forward reads (heads, head_dim, ...) and the config
        hf.update_modules(model)
        hf.update_config(model)
    return done


def _ties(model: nn.Module) -> list[list[str]]:
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return [names for names in seen.values() if len(names) > 1]


def _apply_ties(model: nn.Module, ties: list[list[str]], replaced: set[str]) -> None:
    """Tied weights were one tensor; point every alias at the one that was replaced."""
    for names in ties:
        src = next((n for n in names if n in replaced), None)
        if src is None:
            continue
        owner, leaf = _owner(model, src)
        new = getattr(owner, leaf)
        for other in names:
            o, lf = _owner(model, other)
            setattr(o, lf, new)
