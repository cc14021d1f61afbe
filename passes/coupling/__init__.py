"""Dependency analysis: which channels, neurons and heads must be removed together.

:func:`build_coupling` is the analysis (cached on the graph under ``"coupling"``); its result,
:class:`Coupling`, holds the groups. Imports only the IR layer.
"""

from graphprune.passes.coupling.analysis import Coupling, Group, build_coupling

__all__ = ["Coupling", "Group", "build_coupling"]
