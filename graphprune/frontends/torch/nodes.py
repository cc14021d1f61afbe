"""Naming fx nodes and reaching (and replacing) the tensors they read: shared by capture, writers
and source."""

from __future__ import annotations

import operator
from typing import Any

import torch

from graphprune.frontends.torch.arrays import as_tensor


def aten_name(target: Any) -> str:
    """The bare op name of an fx call target: ``aten.conv2d.default`` → ``"conv2d"``."""
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):  # OpOverload: aten.conv2d.default
        return target._schema.name.split("::")[-1]
    if hasattr(target, "_qualified_op_name"):  # OpOverloadPacket
        return target._qualified_op_name.split("::")[-1]
    return name


def get_tensor(module: torch.nn.Module, target: str) -> torch.Tensor:
    """The parameter, buffer or plain tensor attribute at dotted path ``target``."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor(module: torch.nn.Module, target: str, new: torch.Tensor) -> None:
    """Put ``new`` at dotted path ``target``: a parameter as one, a registered buffer as one."""
    *path, leaf = target.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if isinstance(new, torch.nn.Parameter):
        setattr(owner, leaf, new)
    elif leaf in getattr(owner, "_buffers", {}):
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)


def replacement(old: torch.Tensor, arr: Any) -> torch.Tensor:
    """``arr`` (a numpy array, bf16 as ``ml_dtypes``) as a tensor to stand in for ``old``: its
    dtype, and a :class:`~torch.nn.Parameter` with its ``requires_grad`` if ``old`` is one."""
    new = as_tensor(arr, old.dtype)
    if isinstance(old, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    return new
