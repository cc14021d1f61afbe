"""Naming fx nodes and reaching the tensors they read: shared by capture, writers and source."""

from __future__ import annotations

import operator
from typing import Any

import torch


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
