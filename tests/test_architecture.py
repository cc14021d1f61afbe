"""The layer contract: imports point one way, no cycles, no module over 500 lines, no private
name imported across modules.

import-linter would be the usual tool, but its graph builder (grimp) walks the installed
package's own folder, and ``graphprune.passes``, ``graphprune.codegen`` and ``graphprune.models``
live in other folders (``package-dir`` in pyproject.toml): a contract on ``graphprune`` saw 41
modules and none of those three packages. So this test reads every module's source with ``ast``,
function-level imports included, under the same package-dir mapping as pyproject.toml, and
asserts that it saw every ``.py`` file.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("graphprune.ir", "graphprune.errors", "graphprune.runtime", "graphprune.staging"),
    ("graphprune.frontends",),
    ("graphprune.passes",),
    ("graphprune.codegen",),
    ("graphprune.api",),
    ("graphprune.models", "graphprune.testing"),
    ("graphprune.app", "graphprune.__main__"),
    ("graphprune",),  # the public facade re-exports from every layer
]
# Packages of one layer that must not import each other.
SEPARATE = [("graphprune.models", "graphprune.testing")]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Module name → file, for every package root in pyproject.toml's ``package-dir``."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mods: dict[str, Path] = {}
    for pkg, folder in cfg["package-dir"].items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


MODS = _modules()


def _imports(mod: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full, None, node.lineno) if full in MODS else (base, a.name, node.lineno))
    return out


def _ours(target: str) -> str | None:
    while target and target not in MODS:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def _layer(mod: str) -> int:
    best, level = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > best:
                best, level = len(n), i
    assert level is not None, f"module {mod} is in no layer: add it to LAYERS"
    return level


def _edges() -> list[tuple[str, str, str | None, int]]:
    edges = []
    for m, f in MODS.items():
        for target, name, line in _imports(m, f):
            t = _ours(target)
            if t and t != m:
                edges.append((m, t, name, line))
    return edges


def test_sees_every_module():
    files = {p.resolve() for folder in ("graphprune", "passes", "codegen", "models")
             for p in (ROOT / folder).rglob("*.py")}  # fmt: skip
    assert files == {p.resolve() for p in MODS.values()}
    assert {"graphprune.passes.coupling", "graphprune.codegen.build", "graphprune.models",
            "graphprune.ir.graph", "graphprune.frontends.torch.capture"} <= set(MODS)
    assert len(MODS) > 80


@pytest.mark.parametrize("mod", sorted(MODS))
def test_every_module_has_a_layer(mod):
    _layer(mod)


def test_imports_point_down():
    upward = [f"{MODS[a].relative_to(ROOT)}:{line} imports {b} (layer {_layer(b)} above {_layer(a)})"
              for a, b, _, line in _edges() if _layer(b) > _layer(a)]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_separate_packages_do_not_import_each_other():
    bad = [f"{a} imports {b}" for a, b, _, _ in _edges() for x, y in SEPARATE
           if (a.startswith(x) and b.startswith(y)) or (a.startswith(y) and b.startswith(x))]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = nx.DiGraph((a, b) for a, b, _, _ in _edges())
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, cycles


def test_no_private_names_across_modules():
    bad = [f"{a} imports {b}.{n}" for a, b, n, _ in _edges()
           if n and n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines():
    big = {m: p.read_text().count("\n") for m, p in MODS.items()}
    assert not {m: n for m, n in big.items() if n > MAX_LINES}


def test_the_contract_can_fail():
    """An upward import is caught: ``ir`` importing ``passes`` is reported as upward."""
    assert _layer("graphprune.passes.coupling.build") > _layer("graphprune.ir.graph")
    assert _layer("graphprune.app.cli") > _layer("graphprune.testing.oracle")
    assert _layer("graphprune.testing.oracle") > _layer("graphprune.codegen.build")
