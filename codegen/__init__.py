"""TVM codegen: lower a (pruned) model to Relax, schedule it, emit a deployable artifact.

Entry point :func:`compile`; the artifact is read back by :func:`graphprune.runtime.load` or,
without graphprune, by the snippet in ``codegen/README_SNIPPET.md``. TVM is imported lazily, so
importing this package is cheap.
"""

from __future__ import annotations

__all__ = ["compile"]


def compile(*args, **kwargs):  # noqa: A001
    from graphprune.codegen.compiler import compile as _compile

    return _compile(*args, **kwargs)


compile.__doc__ = "See :func:`graphprune.codegen.compiler.compile`."
