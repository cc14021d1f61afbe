"""The pass contract: :class:`Pass`, :class:`PassResult` and :func:`run_passes`.

A pass is a small object with a ``name``, the names of the passes it ``requires`` to have run
before it, and ``run(graph, **config) -> PassResult``. It never mutates its input graph (nodes,
payloads, weights, masks); an analysis may attach its result to the graph's cache under its own
key (``pg.cached("coupling", ...)``), which is not a change of the graph. Passes follow it:

========================  ====================================  ==============================
pass                      ``run(graph, ...)``                   ``PassResult.value``
========================  ====================================  ==============================
``BuildCoupling``         ``()``                                :class:`Coupling` (groups)
``PruneChannels``         ``(config=PruneConfig)``              :class:`Selection` (what to cut)
``PlanRemoval``           ``(removal={group id: indices})``     :class:`~graphprune.ir.RemovalPlan`
========================  ====================================  ==============================

:func:`run_passes` is a plain ordered pipeline (no scheduler, no constraint solver): it runs the
passes in the order given, checks each one's ``requires`` against the passes already run, and,
with ``verify=True`` (tests), runs :func:`graphprune.ir.verify` on the input and after every pass.

Errors. An exception a pass raises is re-raised as :class:`~graphprune.ir.PassError` (pass name,
the passes before it, the original message) ``from`` the original, *unless* it is already a
:class:`~graphprune.ir.GraphPruneError`: those (``ConfigError``, ``CouplingError``, ...) are
user-facing errors whose messages already name the parameter, node or option at fault, so they
propagate unchanged and ``except ConfigError`` keeps working around a pipeline. A graph that
fails verification after a pass is that pass's fault: that ``VerificationError`` is wrapped in a
``PassError`` naming the pass. An input that fails verification raises the ``VerificationError``
itself (no pass ran yet). A pass whose requirement has not run raises ``PassError`` before it
runs.

Examples
--------
>>> import torch, graphprune as gp
>>> from graphprune.passes.base import run_passes
>>> from graphprune.passes.coupling import BuildCoupling
>>> from graphprune.passes.prune.plan import PlanRemoval
>>> pg = gp.capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
...                 (torch.randn(2, 4),))
>>> results = run_passes(pg, [(BuildCoupling(), {}), (PlanRemoval(), {"removal": {0: [1, 2]}})],
...                      verify=True)
>>> results["PlanRemoval"].changed, results["PlanRemoval"].value.new_shapes["0.weight"]
(True, (6, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from graphprune.ir import GraphPruneError, PassError, PruneGraph, VerificationError
from graphprune.ir.verify import verify as verify_graph

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult(Generic[T]):
    """What a pass returns.

    ``value`` is the pass's product (groups, a selection, a plan); ``changed`` says whether it
    asks for a change of the model (an analysis: always False; a planning pass: True when it
    removes something); ``report`` holds a few numbers or notes for logs and reports.
    """

    value: T
    changed: bool = False
    report: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    """A pass over a :class:`~graphprune.ir.PruneGraph`; see the module docstring."""

    name: str
    requires: tuple[str, ...]

    def run(self, graph: PruneGraph, **config: Any) -> PassResult: ...


# A pass's configuration: keyword arguments for its ``run``, or a function of the results so far
# (by pass name) returning them, for a pass whose input is an earlier pass's output.
Config = Mapping[str, Any] | Callable[[Mapping[str, PassResult]], Mapping[str, Any]]


def run_passes(graph: PruneGraph, passes: Iterable[tuple[Pass, Config]],
               verify: bool = False) -> dict[str, PassResult]:  # fmt: skip
    """Run ``passes`` on ``graph`` in order; return each pass's result by pass name.

    Parameters
    ----------
    graph : PruneGraph
        Read by every pass, changed by none.
    passes : iterable of (pass, config)
        ``config`` is a mapping of keyword arguments for ``pass.run`` or a callable taking the
        results so far (``{name: PassResult}``) and returning that mapping.
    verify : bool
        Verify the input graph, and the graph again after every pass (for tests: it walks the
        whole graph each time).

    Returns
    -------
    dict of str to PassResult
        In run order; a pass run twice keeps its last result.

    Raises
    ------
    PassError
        A pass failed with an exception that is not a ``GraphPruneError``, left a graph that
        fails verification, or needs a pass that has not run.
    GraphPruneError
        Raised by a pass as is (``ConfigError``, ``CouplingError``, ...), or a
        ``VerificationError`` for an input graph that fails verification.
    """
    if verify:
        verify_graph(graph)
    results: dict[str, PassResult] = {}
    ran: list[str] = []
    for p, config in passes:
        missing = [r for r in p.requires if r not in ran]
        if missing:
            raise PassError(p.name, ran, f"requires {', '.join(missing)} to run before it")
        try:
            kwargs = config(results) if callable(config) else config
            result = p.run(graph, **kwargs)
        except GraphPruneError:
            raise
        except Exception as e:
            raise PassError(p.name, ran, f"{type(e).__name__}: {e}") from e
        if verify:
            try:
                verify_graph(graph)
            except VerificationError as e:
                raise PassError(p.name, ran, f"the graph fails verification after it: {e}") from e
        results[p.name] = result
        ran.append(p.name)
    return results
