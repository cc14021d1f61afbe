"""Model zoo: small seeded models that exercise the channel and head coupling cases.

Every factory takes a ``seed`` and returns ``(model, example_inputs)`` with the model in eval
mode and inputs of batch 2 (batch 1 makes ``torch.export`` specialise). ``ZOO`` lists the small
ones, each forward well under 50 ms on two CPU cores; ``resnet50`` and ``hf_bert_base`` are full
size and only for ``benchmarks/``.

``transformers`` and the model modules are imported on first use, so importing this package is
cheap.

Examples
--------
>>> from graphprune import models
>>> model, inputs = models.get("resnet_tiny")
>>> model(*inputs).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_MODEL", "ZOO", "get"]

Factory = Callable[[], tuple[Any, tuple[Any, ...]]]

DEFAULT_MODEL = "resnet_tiny"

# factory name -> submodule; what each model is there to exercise is in its module docstring.
_SMALL = {
    "resnet_tiny": "resnet",
    "resnet_bottleneck_tiny": "resnet",
    "vgg_tiny": "plain",
    "mobilenetv2_tiny": "mobile",
    "shufflenet_tiny": "mobile",
    "densenet_tiny": "densenet",
    "unet_tiny": "unet",
    "digits_cnn": "plain",
    "vit_tiny": "transformer",
    "vit_tiny_sdpa": "transformer",
    "swin_tiny": "swin",
    "maxvit_tiny": "maxvit",
    "llama_tiny": "transformer",
    "llama_tiny_tied": "transformer",
    "hf_bert_tiny": "hf",
    "hf_gpt2_tiny": "hf",
    "hf_llama_tiny": "hf",
    "hf_vit_tiny": "hf",
}
_LARGE = {"resnet50": "resnet", "hf_bert_base": "hf"}


def _lazy(module: str, name: str) -> Factory:
    def factory(seed: int = 0, **kwargs: Any) -> tuple[Any, tuple[Any, ...]]:
        fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return fn(seed=seed, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Lazy alias of ``graphprune.models.{module}.{name}``."
    return factory


ZOO: dict[str, Factory] = {name: _lazy(mod, name) for name, mod in _SMALL.items()}


def get(name: str, seed: int = 0, **kwargs: Any) -> tuple[Any, tuple[Any, ...]]:
    """Build a zoo model (small or large) and its example inputs.

    Parameters
    ----------
    name : str
        A key of ``ZOO``, or ``"resnet50"`` / ``"hf_bert_base"``.
    seed : int
        Seed of the weights and of the example inputs.
    **kwargs
        Passed to the factory (e.g. ``num_classes``).

    Returns
    -------
    (torch.nn.Module, tuple of torch.Tensor)
        The model in eval mode and its example inputs.
    """
    if name in ZOO:
        return ZOO[name](seed=seed, **kwargs)
    if name in _LARGE:
        return _lazy(_LARGE[name], name)(seed=seed, **kwargs)
    known = ", ".join(sorted([*ZOO, *_LARGE]))
    raise KeyError(f"unknown zoo model {name!r}; known: {known}")
