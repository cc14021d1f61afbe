"""Which layers of a torch model the sparsity passes prune, and their 2-D ``(out, reduction)`` view.

Targets are ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2,
weight stored ``(in, out)``). Embeddings are never targets. The output head (the last target to
run, found by one forward pass when inputs are available, else the last one registered) is
excluded by default. Repeated blocks (an ``nn.ModuleList`` of same-type children holding
targets) are found here so calibration can walk them one at a time.

Precondition: the model is an ``nn.Module`` (the torch pass receives one by contract: the API
dispatched on the model's kind). Nothing here mutates it except the one traced forward (in
``torch.no_grad``, hooks removed afterwards).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from graphprune.ir.errors import ConfigError

__all__ = ["Target", "find_targets", "find_blocks", "find_head", "call_model", "is_embedding"]


@dataclass
class Target:
    """One prunable layer: the module, its name, and how its weight maps to ``(out, red)``."""

    name: str  # module name, e.g. "encoder.layer.0.attention.self.query"
    module: nn.Module
    transposed: bool = False  # transformers Conv1D stores (in, out)

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    def shape2d(self) -> tuple[int, int]:
        w = self.module.weight
        if self.transposed:
            return w.shape[1], w.shape[0]
        return w.shape[0], w[0].numel()

    def weight2d(self) -> torch.Tensor:
        """A view (no copy) of the weight as ``(out, reduction)``."""
        w = self.module.weight.data
        return w.t() if self.transposed else w.reshape(w.shape[0], -1)

    def to_param_shape(self, m2d: torch.Tensor) -> torch.Tensor:
        w = self.module.weight
        return m2d.t().contiguous() if self.transposed else m2d.reshape(w.shape)

    def inputs2d(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as rows of the reduction dimension (im2col for convs)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            x = nn.functional.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
            return x.transpose(1, 2).reshape(-1, x.shape[1])
        if isinstance(m, nn.Conv1d):
            k, d, p, s = m.kernel_size[0], m.dilation[0], m.padding[0], m.stride[0]
            x = nn.functional.unfold(x.unsqueeze(-1), (k, 1), (d, 1), (p, 0), (s, 1))
            return x.transpose(1, 2).reshape(-1, x.shape[1])
        return x.reshape(-1, x.shape[-1])


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(m.weight, nn.Parameter)


def is_embedding(m: nn.Module) -> bool:
    return isinstance(m, (nn.Embedding, nn.EmbeddingBag))


def find_targets(model: nn.Module) -> list[Target]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and isinstance(m.weight, nn.Parameter):
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
                continue  # im2col view would not match; such layers are reported as not targets
            out.append(Target(name, m))
        elif _is_hf_conv1d(m):
            out.append(Target(name, m, transposed=True))
    return out


def call_model(model: nn.Module, batch):
    """Calling convention for calibration batches: dict -> kwargs, tuple/list -> args."""
    if isinstance(batch, dict) or hasattr(batch, "keys") and not isinstance(batch, torch.Tensor):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_example(batch):
    """``batch`` cut to its first example when every tensor in it shares one leading size."""
    if isinstance(batch, torch.Tensor):
        tensors = [batch]
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    elif isinstance(batch, (tuple, list)):
        tensors = [v for v in batch if isinstance(v, torch.Tensor)]
    else:
        return batch
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes or sizes == {1}:
        return batch

    def cut(v):
        return v[:1] if isinstance(v, torch.Tensor) else v

    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return {k: cut(v) for k, v in batch.items()}


def find_head(model: nn.Module, targets: list[Target], batch=None) -> str | None:
    """Name of the output head: the last target executed on ``batch``, else the last registered.

    Only the batch's first example runs (execution order does not depend on batch size).
    """
    if not targets:
        return None
    if batch is None:
        return targets[-1].name
    order: list[str] = []
    hooks = [
        t.module.register_forward_hook(lambda m, i, o, n=t.name: order.append(n)) for t in targets
    ]
    try:
        with torch.no_grad():
            one = _first_example(batch)
            try:
                call_model(model, one)
            except Exception:
                if one is batch:
                    raise
                order.clear()  # some models need the whole batch (e.g. fixed batch reshapes)
                call_model(model, batch)
    except Exception as e:  # the user's model failed on the user's inputs: say so in our terms
        raise ConfigError(
            f"example_inputs: the model failed to run on them ({type(e).__name__}: {e}); pass "
            "inputs the model accepts (tensor, tuple of args, or dict of kwargs)"
        ) from e
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else targets[-1].name


def find_blocks(model: nn.Module, targets: list[Target]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of repeated blocks holding the most targets (>= 2 blocks), if any."""
    names = {t.name for t in targets}
    best, best_count = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        count = sum(1 for n in names if n.startswith(f"{name}." if name else ""))
        if count > best_count:
            best, best_count = (name, m), count
    return best


def match_exclude(name: str, patterns: list[str]) -> str | None:
    """The first exclude pattern (exact name, param name or glob) matching module ``name``."""
    for p in patterns:
        if name == p or f"{name}.weight" == p or fnmatch.fnmatchcase(name, p):
            return p
    return None
