"""The distillation loss behind :func:`graphprune.api.recover.recover`: what is compared, how.

Teacher and student run on the same batch; the *output* term compares the main output (logits:
``T^2 * KL`` at temperature ``T``; otherwise a normalised MSE or ``1 - cosine``), the *hidden*
term the outputs of each block of the model's layer list (``nn.ModuleList`` of repeated layers)
whose shapes agree, by forward hooks. Padding positions are left out when the batch holds an
``attention_mask``. Also the learning-rate schedule and the progress display of the loop.
Torch only; nothing here changes a model's weights.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.frontends.torch.outputs import flatten_outputs
from graphprune.ir.errors import ConfigError

__all__ = ["Distiller", "Progress", "call_model", "lr_factor", "normalised_mse"]


def call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise ConfigError(f"a batch is a tensor, a tuple of inputs or a dict of kwargs, not "
                      f"{type(batch).__name__}")  # fmt: skip


# -- the loss ---------------------------------------------------------------------------------
def main_output(out: Any) -> tuple[torch.Tensor, bool]:
    """The output the loss compares and whether it is named ``logits``."""
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key], key == "logits"
    for t in flatten_outputs(out):
        if t.is_floating_point():
            return t, False
    raise ConfigError("the model returned no floating-point tensor to distil on")


def vocab_sizes(model: nn.Module) -> set[int]:
    return {int(v) for m in model.modules()
            if isinstance(v := getattr(getattr(m, "config", None), "vocab_size", None), int)}


def token_mask(batch: Any, out: torch.Tensor) -> torch.Tensor | None:
    am = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(am, torch.Tensor) and out.dim() >= 3 and tuple(am.shape) == tuple(out.shape[:2]):
        return am.to(out.dtype)
    return None


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions of a per-position loss ``x`` (shape ``out.shape[:-1]``)."""
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def output_loss_of(kind: str, s: torch.Tensor, t: torch.Tensor, mask, temperature: float):
    s, t = s.float(), t.float()
    if kind == "kl":
        logp_s = F.log_softmax(s / temperature, dim=-1)
        logp_t = F.log_softmax(t / temperature, dim=-1)
        per = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
        return temperature**2 * masked_mean(per, mask)
    if kind == "cosine":
        return masked_mean(1 - F.cosine_similarity(s, t, dim=-1), mask)
    return normalised_mse(s, t, mask)


def normalised_mse(s: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
    """MSE divided by the teacher's mean square: comparable across layers of different scale."""
    s, t = s.float(), t.float()
    if mask is None or s.dim() < 3:
        return ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
    return (masked_mean(((s - t) ** 2).mean(-1), mask)
            / masked_mean((t**2).mean(-1), mask).clamp_min(1e-12))  # fmt: skip


class LayerTaps:
    """Forward hooks on the blocks of the model's layer list: the first tensor each returns."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: self.out.__setitem__(name, first_tensor(o))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def first_tensor(out: Any) -> torch.Tensor | None:
    ts = flatten_outputs(out)
    return ts[0] if ts else None


def layer_names(student: nn.Module, teacher: nn.Module, report: Any) -> list[str]:
    """Names of the student's repeated blocks that the teacher has too (same list, same length)."""
    lists = [(n, m) for n, m in student.named_modules() if isinstance(m, nn.ModuleList)
             and len(m) >= 2 and len({type(c) for c in m}) == 1]  # fmt: skip
    if not lists:
        report.notes.append("no block list (nn.ModuleList of repeated layers) in the student: "
                            "output loss only")  # fmt: skip
        return []
    name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    try:
        theirs = teacher.get_submodule(name)
    except AttributeError:
        theirs = None
    if not isinstance(theirs, nn.ModuleList) or len(theirs) != len(blocks):
        report.notes.append(f"the teacher has no block list {name!r} of {len(blocks)} layers "
                            "(depth pruning?): output loss only")  # fmt: skip
        return []
    return [f"{name}.{i}" for i in range(len(blocks))]


class Distiller:
    """The distillation loss of one batch (teacher and student forward passes)."""

    def __init__(self, student, teacher, report: Any, temperature, hidden_weight):
        self.student, self.teacher, self.report = student, teacher, report
        self.temperature, self.hidden_weight = temperature, hidden_weight
        names = layer_names(student, teacher, report) if hidden_weight > 0 else []
        self.s_taps, self.t_taps = LayerTaps(student, names), LayerTaps(teacher, names)
        self.layers: list[str] | None = None  # settled on the first batch (shapes known)
        self.kind = report.output_loss

    def close(self) -> None:
        self.s_taps.remove()
        self.t_taps.remove()

    def _settle(self, s_out, t_out, s_logits: bool) -> None:
        if tuple(s_out.shape) != tuple(t_out.shape):
            raise ConfigError(f"the student's output has shape {tuple(s_out.shape)}, the "
                              f"teacher's {tuple(t_out.shape)}: they must agree to distil "
                              "(is the teacher the model the student was pruned from?)")
        if self.kind == "auto":
            lm = s_logits or (s_out.dim() >= 2 and s_out.shape[-1] in vocab_sizes(self.student))
            self.kind = self.report.output_loss = "kl" if lm else "mse"
        self.layers = []
        for name, t in self.t_taps.out.items():
            s = self.s_taps.out.get(name)
            if s is None or t is None or tuple(s.shape) != tuple(t.shape):
                got = None if s is None else tuple(s.shape)
                self.report.skipped_layers[name] = (
                    f"student output {got} vs teacher {None if t is None else tuple(t.shape)}")
            else:
                self.layers.append(name)
        self.report.hidden_layers = list(self.layers)

    def loss(self, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            t_out, _ = main_output(call_model(self.teacher, batch))
        s_out, s_logits = main_output(call_model(self.student, batch))
        if self.layers is None:
            self._settle(s_out, t_out, s_logits)
        mask = token_mask(batch, t_out)
        total = output_loss_of(self.kind, s_out, t_out, mask, self.temperature)
        if self.layers:
            hidden = [normalised_mse(self.s_taps.out[n], self.t_taps.out[n], mask)
                      for n in self.layers]  # fmt: skip
            total = total + self.hidden_weight * torch.stack(hidden).mean()
        return total

    def measure(self, batches: list) -> float:
        if not batches:
            return float("nan")
        with torch.no_grad():
            return float(sum(self.loss(b).item() for b in batches) / len(batches))


def lr_factor(steps: int, warmup: float):
    n_warm = round(warmup * steps)

    def factor(i: int) -> float:  # i = optimizer steps taken so far
        if i < n_warm:
            return (i + 1) / n_warm
        rest = max(steps - n_warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(i - n_warm, rest) / rest))

    return factor



class Progress:
    """tqdm when installed, else a line on stderr every tenth of the run; silent when off."""

    def __init__(self, steps: int, enabled: bool):
        self.steps, self.enabled, self.bar = steps, enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=steps, desc="recover", unit="step")
            except ImportError:
                self.bar = None
        self.every = max(1, steps // 10)

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        elif done % self.every == 0 or done == self.steps:
            print(f"recover: step {done}/{self.steps} loss {loss:.4g}", file=sys.stderr,
                  flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
