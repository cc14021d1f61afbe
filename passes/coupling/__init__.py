"""Dependency analysis: which channels, neurons and heads must be removed together.

:func:`build_coupling` is the analysis (cached on the graph under ``"coupling"``), and
:class:`BuildCoupling` the same as a pass (``graphprune.passes.base``); its result,
:class:`Coupling`, holds the :class:`Group` s. Modules: ``table`` (the union-find of dimension
variables), ``rules`` (the op rule registry) and ``rules_*`` (the rules, by op family),
``groups`` (the result types), ``build`` (the analysis). Imports only the IR layer and
``graphprune.passes.base``.
"""

from graphprune.passes.coupling.build import BuildCoupling, analyse_coupling, build_coupling
from graphprune.passes.coupling.groups import Coupling, Group, Member
from graphprune.passes.coupling.rules import COUPLING_RULES, RuleContext, coupling_rule

__all__ = [
    "analyse_coupling",
    "COUPLING_RULES", "BuildCoupling", "Coupling", "Group", "Member", "RuleContext",
    "build_coupling", "coupling_rule",
]  # fmt: skip
