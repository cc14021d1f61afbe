"""The numpydoc examples in the public API run and say what they show."""

import doctest
import importlib

import pytest

MODULES = ["graphprune.api", "graphprune.remove", "graphprune.pruning", "graphprune.schedule",
           "graphprune.ir", "graphprune.passes.coupling", "graphprune.models.digits"]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
