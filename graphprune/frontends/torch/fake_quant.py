"""Torch write-back of quantization: a module that computes as the INT8 kernels will.

:func:`apply_fake_quant` replaces each quantized weight by ``dequantize(quantize(W))`` (the float
values the int8 weight stands for) and, for W8A8, fake-quantizes the layer's input with a forward
pre-hook that reads the scale from a buffer of the layer itself (``input_scale``: the static
per-tensor scale, or 0 for dynamic scales computed per token at run time). The hook is a
module-level function and the scale a registered buffer, so the result survives
``copy.deepcopy``, pickling and ``state_dict()`` (which then also holds ``<layer>.input_scale``).
:func:`write_params` writes arrays into parameters by name (SmoothQuant's migrated weights).

The numerics are :func:`graphprune.ir.quant.fake_quantize_act`'s: round half to even, clip to
``[-127, 127]``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import QMAX, QuantSpec, fake_quantize

__all__ = ["apply_fake_quant", "is_fake_quantized", "write_params"]


def _fake_quantize_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    s = module.input_scale
    if float(s) <= 0.0:  # dynamic: per token (last axis) for linears, per tensor for convs
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            amax = x.detach().abs().amax()
        else:
            amax = x.detach().abs().amax(dim=-1, keepdim=True)
        s = amax.clamp_min(1e-30) / QMAX
    s = s.to(x.dtype)
    return (torch.clamp(torch.round(x / s), -QMAX, QMAX) * s, *args[1:])


def is_fake_quantized(module: nn.Module) -> bool:
    return _fake_quantize_input in getattr(module, "_forward_pre_hooks", {}).values()


def write_params(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Write each array into the parameter of that name (shapes checked first)."""
    params = []
    for name, a in arrays.items():
        try:
            p = model.get_parameter(name)
        except AttributeError as e:
            raise ConfigError(f"the model has no parameter {name!r} to write") from e
        if tuple(p.shape) != tuple(np.shape(a)):
            raise ConfigError(f"parameter {name!r} has shape {tuple(p.shape)}, the new value "
                              f"{tuple(np.shape(a))}")  # fmt: skip
        params.append((p, a))
    with torch.no_grad():
        for p, a in params:
            p.copy_(torch.as_tensor(np.asarray(a), dtype=p.dtype))


def apply_fake_quant(model: nn.Module, specs: Mapping[str, QuantSpec],
                     layers: Mapping[str, str], inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every weight in ``specs`` fake-quantized and,
    for W8A8 specs, the input of its layer (``layers``: weight name -> module name) too.

    Examples
    --------
    >>> from graphprune.ir.quant import weight_scales
    >>> lin = nn.Linear(4, 2)
    >>> spec = QuantSpec("w8a8_dynamic", weight_scales(lin.weight.detach().numpy()), 0)
    >>> q = apply_fake_quant(lin, {"weight": spec}, {"weight": ""})
    >>> sorted(q.state_dict()), is_fake_quantized(copy.deepcopy(q))
    (['bias', 'input_scale', 'weight'], True)
    """
    out = model if inplace else copy.deepcopy(model)
    arrays = {}
    for name, spec in specs.items():
        w = out.get_parameter(name).detach().cpu().float().numpy()
        arrays[name] = fake_quantize(w, spec)
    write_params(out, arrays)
    for name, spec in specs.items():
        if spec.scheme == "w8":
            continue
        mod = out.get_submodule(layers[name])
        if is_fake_quantized(mod):
            raise ConfigError(f"layer {layers[name]!r} is already fake-quantized: quantize the "
                              "float model, not a gp.quantize result")  # fmt: skip
        mod.register_buffer("input_scale", torch.tensor(float(spec.act_scale or 0.0)))
        mod.register_forward_pre_hook(_fake_quantize_input)
    return out


def remove_input_quant(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) without the input fake-quantization hooks and their
    ``input_scale`` buffers: the float module codegen compiles (its weights stay on the int8
    grid, so quantizing them again gives the same int8 values)."""
    out = model if inplace else copy.deepcopy(model)
    for mod in out.modules():
        hooks = getattr(mod, "_forward_pre_hooks", {})
        for k in [k for k, h in hooks.items() if h is _fake_quantize_input]:
            del hooks[k]
        if "input_scale" in getattr(mod, "_buffers", {}):
            del mod._buffers["input_scale"]
    return out
