"""``gp.recover``: masked distillation of a pruned or sparsified model against its dense teacher.

Runs after ``gp.prune`` / ``gp.sparsify`` and before ``gp.compile``: the student (the result's
model) is fine-tuned for a few hundred steps to reproduce the dense teacher's outputs on
unlabeled batches. The loss is an *output* term plus *hidden-state* terms:

- output: KL divergence of the logits at a temperature for language models (``T^2 * KL``, as in
  Hinton et al. 2015), a normalised MSE (or ``1 - cosine``) of the first output otherwise (an
  encoder's last hidden state). Padding positions are left out when the batch holds an
  ``attention_mask``.
- hidden: one normalised MSE per layer of the model's block list (the ``nn.ModuleList`` of
  repeated layers), between the student's and the teacher's layer outputs. Only layers whose
  output shapes agree are compared, without a learned projection: after sparsification every
  layer qualifies; after structured pruning that keeps the residual width (head and MLP
  channels only) too, while a layer whose output width changed (``gp.prune`` of a transformers
  model cuts the residual stream as well at larger ratios) is listed in
  ``report.skipped_layers`` with both shapes, and the output term carries the recovery. After
  depth pruning (a different number of layers, or a ``GraphModule`` without the block list)
  only the output term is used.

Masks held: the sparsity pattern (``res.masks``, else every exact zero of the model's weight
matrices) is kept exactly with :func:`graphprune.frontends.torch.masks.keep_masks`: masked
gradients are zeroed, and the weights re-masked before every forward and after every optimizer
step, so Adam's momentum cannot revive a pruned weight. An N:M pattern stays N:M.

Guarantees: torch models only; the input result and its model are never mutated unless
``inplace=True``; the teacher is only run (``no_grad``, eval mode). Runs are deterministic for a
given ``seed`` and data order. Bad options raise :class:`~graphprune.ir.errors.ConfigError`
naming the option.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphprune.api.distill import Distiller, Progress, lr_factor
from graphprune.frontends.torch.masks import keep_masks
from graphprune.ir.errors import ConfigError

__all__ = ["RecoverResult", "RecoveryReport", "recover", "text_batches"]

_OUTPUT_LOSSES = ("auto", "kl", "mse", "cosine")


@dataclass
class RecoveryReport:
    """What :func:`recover` did: the loss curve (one total loss per step), the distillation loss
    on the first batches before and after, and which layers the hidden-state loss compared."""

    steps: int
    output_loss: str
    losses: list[float] = field(default_factory=list)
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    hidden_layers: list[str] = field(default_factory=list)
    skipped_layers: dict[str, str] = field(default_factory=dict)
    masked_params: int = 0
    mask_source: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        out = [
            (f"recovery: {self.steps} steps, output loss {self.output_loss}, "
             f"{len(self.hidden_layers)} hidden-state layers, {self.seconds:.1f} s"),
            (f"distillation loss on the first batches: {self.loss_before:.5g} -> "
             f"{self.loss_after:.5g}"),
            f"masks held: {self.masked_params} parameters ({self.mask_source})",
        ]
        out += [f"  layer {k} not compared: {why}" for k, why in self.skipped_layers.items()]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


@dataclass
class RecoverResult:
    """What :func:`recover` returns. ``graph`` is the input result's (its masks still hold: the
    pattern was kept), so ``gp.compile(result, ...)`` works as on the input; ``source`` is the
    input itself (a result or a module)."""

    model: nn.Module
    report: RecoveryReport
    masks: dict[str, torch.Tensor]
    graph: Any = None
    source: Any = None


def recover(res: Any, teacher: nn.Module, data: Iterable, steps: int = 200, lr: float = 1e-4,
            *, output_loss: str = "auto", temperature: float = 2.0, hidden_weight: float = 1.0,
            weight_decay: float = 0.0, warmup: float = 0.05, max_grad_norm: float | None = 1.0,
            masks: Mapping[str, Any] | None = None, eval_batches: int = 4, seed: int = 0,
            progress: bool = True, inplace: bool = False) -> RecoverResult:  # fmt: skip
    """Fine-tune a pruned or sparsified model by distillation from the dense ``teacher``, with
    its sparsity masks held.

    Parameters
    ----------
    res : PruneResult, SparsifyResult or torch.nn.Module
        The student: ``res.model`` (or the module itself).
    teacher : torch.nn.Module
        The dense model, run on the same batches (not trained, not modified).
    data : list or iterable of batches
        Unlabeled model inputs: a tensor, a tuple of positional args or a dict of kwargs (e.g. a
        tokenizer's output; see :func:`text_batches`). Cycled when shorter than ``steps`` (a
        one-shot iterator that runs out ends the training, with a note).
    steps : int
        Optimizer steps (AdamW, linear warm-up over ``warmup`` of them, cosine decay to zero).
    lr, weight_decay, max_grad_norm : AdamW's learning rate and weight decay; gradient-norm
        clipping (``None``: none).
    output_loss : {"auto", "kl", "mse", "cosine"}
        ``auto``: KL on logits when the output is a language model's (a ``logits`` field, or a
        last dim equal to the model config's ``vocab_size``), normalised MSE otherwise.
    temperature : float
        Softmax temperature of the KL term.
    hidden_weight : float
        Weight of the mean per-layer hidden-state loss (0: output loss only).
    masks : dict, optional
        ``{parameter name: bool keep-mask}`` to hold; default ``res.masks`` (a SparsifyResult),
        else the exact zeros of every weight matrix of the student that has any.
    eval_batches : int
        How many of the first batches measure ``report.loss_before`` / ``loss_after``.
    seed : int
        Seeds torch's generator for the run (the caller's generator state is restored).
    progress : bool
        A tqdm bar when tqdm is installed, else a line on stderr every tenth of the run.
    inplace : bool
        Train the given model itself instead of a copy.

    Returns
    -------
    RecoverResult(model, report, masks, graph, source)

    Examples
    --------
    >>> import torch, graphprune as gp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> dense = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> data = [torch.randn(8, 16) for _ in range(4)]
    >>> sp = gp.sparsify(dense, data[0], sparsity=0.5, exclude=[])
    >>> rec = gp.recover(sp, dense, data, steps=50, lr=1e-2, progress=False)
    >>> rec.report.loss_after < rec.report.loss_before
    True
    >>> bool((rec.model[0].weight[~sp.masks["0.weight"]] == 0).all())
    True
    """
    _check_options(steps=steps, lr=lr, output_loss=output_loss, temperature=temperature,
                   hidden_weight=hidden_weight, weight_decay=weight_decay, warmup=warmup,
                   max_grad_norm=max_grad_norm, eval_batches=eval_batches, seed=seed,
                   progress=progress, inplace=inplace)  # fmt: skip
    model = _student_of(res)
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher={type(teacher).__name__}: pass the dense torch.nn.Module the "
                          "student was pruned from")  # fmt: skip
    if teacher is model:
        raise ConfigError("teacher is the student itself: pass the dense model (keep a copy "
                          "before pruning with inplace=True)")  # fmt: skip
    batches = _Batches(data)
    student = model if inplace else copy.deepcopy(model)
    held, source = _masks_of(res, student, masks)
    report = RecoveryReport(steps=steps, output_loss=output_loss, masked_params=len(held),
                            mask_source=source)  # fmt: skip
    was_training, teacher_training = student.training, teacher.training
    student.eval()  # dropout off: the student should match the teacher's eval-mode function
    teacher.eval()
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _train(student, teacher, batches, held, report, lr=lr, temperature=temperature,
                   hidden_weight=hidden_weight, weight_decay=weight_decay, warmup=warmup,
                   max_grad_norm=max_grad_norm, eval_batches=eval_batches,
                   progress=progress)  # fmt: skip
    finally:
        student.train(was_training)
        teacher.train(teacher_training)
    report.seconds = time.perf_counter() - t0
    return RecoverResult(student, report, held, getattr(res, "graph", None), res)


def text_batches(tokenizer: Any, text: str | Iterable[str], *, batch_size: int = 8,
                 seq_len: int = 128, mode: str = "stream",
                 max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Tokenised batches of unlabeled text for :func:`recover` (and calibration).

    ``mode="stream"`` (language models): the text is tokenised as one stream and cut into
    ``batch_size`` rows of ``seq_len`` tokens, ``{"input_ids"}``. ``mode="lines"`` (encoders):
    each non-empty line is one sequence (truncated to ``seq_len``), ``batch_size`` lines per
    padded batch, ``{"input_ids", "attention_mask", ...}`` as the tokenizer returns them.
    """
    if mode not in ("stream", "lines"):
        raise ConfigError(f"mode={mode!r}: pass 'stream' (language models) or 'lines' (encoders)")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ConfigError(f"{name}={v!r}: pass an integer >= 1")
    lines = text.splitlines() if isinstance(text, str) else list(text)
    lines = [s.strip() for s in lines if s and s.strip()]
    if not lines:
        raise ConfigError("text_batches: the text is empty; pass unlabeled text to distil on")
    out: list[dict[str, torch.Tensor]] = []
    if mode == "lines":
        for i in range(0, len(lines) - batch_size + 1, batch_size):
            enc = tokenizer(lines[i : i + batch_size], padding=True, truncation=True,
                            max_length=seq_len, return_tensors="pt")  # fmt: skip
            out.append({k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)})
    else:
        ids = tokenizer("\n".join(lines), return_tensors="pt")["input_ids"][0]
        per = batch_size * seq_len
        for i in range(0, len(ids) - per + 1, per):
            out.append({"input_ids": ids[i : i + per].reshape(batch_size, seq_len)})
    if not out:
        raise ConfigError(f"text_batches: the text is shorter than one batch ({batch_size} x "
                          f"{seq_len}); give more text or smaller batch_size/seq_len")  # fmt: skip
    return out[:max_batches] if max_batches else out


# -- options and inputs -----------------------------------------------------------------------
def _check_options(*, steps, lr, output_loss, temperature, hidden_weight, weight_decay, warmup,
                   max_grad_norm, eval_batches, seed, progress, inplace) -> None:  # fmt: skip
    def number(name, v, lo, lo_open=True, none_ok=False):
        if v is None and none_ok:
            return
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
        if not ok or v < lo or (lo_open and v == lo):
            rel = ">" if lo_open else ">="
            raise ConfigError(f"{name}={v!r}: pass a finite number {rel} {lo:g}")

    for name, v, lo in (("steps", steps, 1), ("eval_batches", eval_batches, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ConfigError(f"{name}={v!r}: pass an integer >= {lo}, e.g. {name}=200")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed={seed!r}: pass an integer, e.g. seed=0")
    number("lr", lr, 0.0)
    number("temperature", temperature, 0.0)
    number("hidden_weight", hidden_weight, 0.0, lo_open=False)
    number("weight_decay", weight_decay, 0.0, lo_open=False)
    number("max_grad_norm", max_grad_norm, 0.0, none_ok=True)
    number("warmup", warmup, 0.0, lo_open=False)
    if warmup >= 1:
        raise ConfigError(f"warmup={warmup!r}: pass the warm-up fraction of steps, in [0, 1)")
    if output_loss not in _OUTPUT_LOSSES:
        raise ConfigError(f"output_loss={output_loss!r}: pass one of {', '.join(_OUTPUT_LOSSES)}")
    for name, v in (("progress", progress), ("inplace", inplace)):
        if not isinstance(v, bool):
            raise ConfigError(f"{name}={v!r}: pass True or False")


def _student_of(res: Any) -> nn.Module:
    model = res if isinstance(res, nn.Module) else getattr(res, "model", None)
    if not isinstance(model, nn.Module):
        got = type(model if model is not None else res).__name__
        raise ConfigError(f"res: recover fine-tunes a torch model; got {got}. Pass gp.prune's or "
                          "gp.sparsify's result for a torch model, or the nn.Module itself "
                          "(an ONNX model cannot be trained here)")  # fmt: skip
    return model


def _masks_of(res: Any, student: nn.Module,
              given: Mapping[str, Any] | None) -> tuple[dict[str, torch.Tensor], str]:  # fmt: skip
    """The keep-masks to hold on ``student`` and where they came from."""
    params = dict(student.named_parameters())
    if given is None and getattr(res, "masks", None):
        given, source = res.masks, "the result's masks"
    elif given is not None:
        source = "masks="
    else:
        found = {n: p.detach() != 0 for n, p in params.items()
                 if p.dim() >= 2 and p.is_floating_point() and not bool((p != 0).all())}
        return found, f"exact zeros of {len(found)} weight matrices"
    out = {}
    for name, m in given.items():
        if name not in params:
            raise ConfigError(f"masks: {name!r} is not a parameter of the model (it has e.g. "
                              f"{list(params)[:3]}); pass masks keyed by named_parameters()")
        m = torch.as_tensor(m).to(torch.bool)
        if tuple(m.shape) != tuple(params[name].shape):
            raise ConfigError(f"masks: {name!r} has shape {tuple(m.shape)}, the parameter "
                              f"{tuple(params[name].shape)}")  # fmt: skip
        out[name] = m
    return out, source


class _Batches:
    """The data, cycled when re-iterable; a one-shot iterator ends the run when it runs out."""

    def __init__(self, data: Any):
        if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise ConfigError(f"data={type(data).__name__}: pass a list (or iterable) of batches "
                              "(a tensor, a tuple of inputs or a dict of kwargs each)")  # fmt: skip
        self.data, self.cached = data, (list(data) if isinstance(data, (list, tuple)) else None)
        if self.cached is not None and not self.cached:
            raise ConfigError("data is empty: pass at least one batch")
        self.one_shot = isinstance(data, Iterator)

    def first(self, n: int) -> list:
        if self.cached is not None:
            return self.cached[:n]
        if self.one_shot:  # do not consume the user's iterator for the measurement
            return []
        return [b for b, _ in zip(self.data, range(n))]

    def __iter__(self) -> Iterator:
        while True:
            empty = True
            for b in self.cached if self.cached is not None else self.data:
                empty = False
                yield b
            if empty:
                raise ConfigError("data is empty: pass at least one batch")
            if self.one_shot:
                return


# -- the loop ---------------------------------------------------------------------------------
def _fp32_master(student: nn.Module, report: RecoveryReport):
    """Half-precision students train in fp32 (AdamW's small updates vanish in bf16 rounding);
    returns the callback that casts every parameter and buffer back to its own dtype."""
    tensors = [t for t in (*student.parameters(), *student.buffers())
               if t.dtype in (torch.bfloat16, torch.float16)]  # fmt: skip
    if not tensors:
        return lambda: None
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    report.notes.append(f"{len(tensors)} half-precision tensors trained in fp32 and cast back "
                        f"to {sorted({str(d).replace('torch.', '') for d in dtypes})}")

    def restore() -> None:
        for t, d in zip(tensors, dtypes):
            t.data = t.data.to(d)

    return restore


def _train(student, teacher, batches: _Batches, held, report: RecoveryReport, *, lr,
           temperature, hidden_weight, weight_decay, warmup, max_grad_norm, eval_batches,
           progress) -> None:  # fmt: skip
    steps = report.steps
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("res: the student has no trainable parameters (all requires_grad="
                          "False)")  # fmt: skip
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, warmup))
    dist = Distiller(student, teacher, report, temperature, hidden_weight)
    bar = Progress(steps, progress)
    head = batches.first(eval_batches)
    restore = lambda: None
    try:
        with keep_masks(student, held, opt):
            report.loss_before = dist.measure(head)
            restore = _fp32_master(student, report)  # after: both losses in the model's dtype
            done = 0
            for batch in batches:
                if done == steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss = dist.loss(batch)
                if not torch.isfinite(loss):
                    raise ConfigError(f"the distillation loss is {loss.item()} at step {done}: "
                                      f"lower lr (now {lr:g})")  # fmt: skip
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
                done += 1
                report.losses.append(float(loss.item()))
                bar.update(done, report.losses[-1])
            if done < steps:
                report.notes.append(f"the data (a one-shot iterator) ran out after {done} of "
                                    f"{steps} steps")  # fmt: skip
                report.steps = done
            restore()  # the model's own dtypes again, before the loss after is measured
            report.loss_after = dist.measure(head)
    finally:
        restore()  # also on an error: an inplace model keeps its dtypes
        dist.close()
        bar.close()
    for name, m in held.items():  # invariant: keep_masks re-masked after the last step
        assert not bool(dict(student.named_parameters())[name].detach()[~m].any()), name
