"""TVM's private APIs are reached from one module only (``codegen/tvm_compat.py``).

A private name is ``_x`` (not a dunder) imported from a ``tvm`` module, or an attribute ``._x``
read on a name bound to something from ``tvm``; patching ``sys.modules`` counts too (it is how
``import_cpu_tensor_intrinsics`` skips TVM's package ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CODEGEN = Path(__file__).resolve().parents[2] / "codegen"
COMPAT = CODEGEN / "tvm_compat.py"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def tvm_private_uses(source: str) -> list[str]:
    """``["line: what"]`` for every private TVM name ``source`` uses."""
    tree = ast.parse(source)
    tvm_names: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tvm":
                    tvm_names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tvm":
            for a in node.names:
                tvm_names.add(a.asname or a.name)
                if _private(a.name) or any(_private(p) for p in node.module.split(".")):
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in tvm_names:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules":
            if isinstance(node.ctx, ast.Store):
                found.append(f"{node.lineno}: {ast.unparse(node)} = ...")
    return found


def test_the_checker_sees_each_kind_of_use():
    src = (
        "import tvm\nfrom tvm.s_tir.meta_schedule.tune_context import _normalize_mod\n"
        "from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig\n"
        "import sys\nEvaluatorConfig._normalized(None)\ntvm.ir._ffi_api.x\n"
        "sys.modules['tvm.x'] = None\nEvaluatorConfig()\ntvm.ir.Op.get('relax.add')\n"
    )
    assert sorted(int(u.split(":")[0]) for u in tvm_private_uses(src)) == [2, 5, 6, 7]


@pytest.mark.parametrize(
    "path", sorted(p for p in CODEGEN.rglob("*.py") if p != COMPAT), ids=lambda p: p.name
)
def test_no_private_tvm_api_outside_tvm_compat(path):
    assert tvm_private_uses(path.read_text()) == [], (
        f"{path.relative_to(CODEGEN.parent)} uses TVM internals: wrap them in codegen/tvm_compat.py"
    )


def test_tvm_compat_wraps_what_it_says():
    uses = tvm_private_uses(COMPAT.read_text())
    assert any("_normalize_mod" in u for u in uses) and any("sys.modules" in u for u in uses)
