"""Symbolic sizes of non-channel axes: the expressions :attr:`Value.symbols` holds, evaluated.

A frontend that keeps an input axis dynamic (batch, sequence) names it (``"batch"``, ``"seq"``)
and records, for every value, each axis's size as an expression over those names
(``"batch"``, ``"17*batch"``, ``"seq + 1"``, ``"(seq//2)"``); ``Value.shape`` keeps the sizes at
the example inputs. :func:`eval_dim` evaluates an expression at other sizes (the cost model's
"MACs at a stated shape"). Only integer arithmetic is accepted; anything else evaluates to
``None`` and the caller keeps the example size.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_CALLS = {"Max": max, "Min": min, "max": max, "min": min}


def _eval(node: ast.AST, sizes: Mapping[str, int]) -> int:
    if isinstance(node, ast.Expression):
        return _eval(node.body, sizes)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return int(sizes[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, sizes), _eval(node.right, sizes))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, sizes)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        return _CALLS[node.func.id](*(_eval(a, sizes) for a in node.args))
    raise ValueError(f"unsupported size expression {ast.dump(node)}")


def eval_dim(expr: str, sizes: Mapping[str, int]) -> int | None:
    """The value of size expression ``expr`` with each dim name set from ``sizes``; ``None``
    when the expression names a dim ``sizes`` lacks or is not plain integer arithmetic.

    Examples
    --------
    >>> eval_dim("17*batch", {"batch": 3})
    51
    >>> eval_dim("(seq//2) + 1", {"seq": 9}), eval_dim("batch", {})
    (5, None)
    """
    try:
        return int(_eval(ast.parse(expr.strip(), mode="eval"), sizes))
    except (SyntaxError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def dim_names(expr: str) -> set[str]:
    """The dim names ``expr`` reads (empty for an expression that does not parse)."""
    try:
        return {n.id for n in ast.walk(ast.parse(expr.strip(), mode="eval"))
                if isinstance(n, ast.Name) and n.id not in _CALLS}  # fmt: skip
    except SyntaxError:
        return set()
