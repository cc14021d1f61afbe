"""The numpydoc examples in the public API run and say what they show."""

import doctest
import importlib

import pytest

MODULES = ["graphprune.api.graph", "graphprune.api.remove", "graphprune.api.structured",
           "graphprune.api.iterative", "graphprune.api.options", "graphprune.ir.graph", "graphprune.ir.verify",
           "graphprune.passes.base", "graphprune.passes.coupling.build", "graphprune.models.digits",
           "graphprune.ir.quant", "graphprune.passes.quant.config", "graphprune.passes.quant.smooth",
           "graphprune.frontends.onnx.qdq", "graphprune.frontends.torch.fake_quant",
           "graphprune.api.quantize"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
