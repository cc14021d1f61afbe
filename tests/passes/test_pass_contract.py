"""The pass contract (``graphprune.passes.base``): order, requirements, error wrapping,
verification, and the passes BuildCoupling → PruneChannels → PlanRemoval leaving their input
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from helpers import fingerprint

import graphprune as gp
from graphprune import models
from graphprune.ir import (
    ConfigError, CouplingError, OpNode, PassError, PruneGraph, Value, VerificationError,
)  # fmt: skip
from graphprune.passes.base import PassResult, run_passes
from graphprune.passes.coupling import BuildCoupling, coupling_rule
from graphprune.passes.prune.channels import PruneChannels, PruneConfig
from graphprune.passes.prune.plan import PlanRemoval


@dataclass
class Step:
    """A test pass: records its call in ``log`` and runs ``body`` (if any) on the graph."""

    name: str
    log: list = field(default_factory=list)
    requires: tuple[str, ...] = ()
    body: Callable[[PruneGraph], Any] | None = None

    def run(self, graph: PruneGraph, **config: Any) -> PassResult:
        self.log.append((self.name, config))
        return PassResult(self.body(graph) if self.body else self.name, False, {})


def mlp() -> PruneGraph:
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return gp.capture(m, (torch.randn(2, 4),))


def test_passes_run_in_the_given_order_with_their_config():
    log: list = []
    out = run_passes(mlp(), [(Step("C", log), {"k": 1}), (Step("A", log), {}),
                             (Step("B", log), {"k": 2})])  # fmt: skip
    assert log == [("C", {"k": 1}), ("A", {}), ("B", {"k": 2})]
    assert list(out) == ["C", "A", "B"]
    assert [r.value for r in out.values()] == ["C", "A", "B"]


def test_a_config_function_sees_the_results_so_far():
    log: list = []
    run_passes(mlp(), [(Step("A", log), {}),
                       (Step("B", log), lambda results: {"seen": sorted(results)})])  # fmt: skip
    assert log[1] == ("B", {"seen": ["A"]})


def test_a_requirement_that_has_not_run_fails_before_the_pass():
    log: list = []
    with pytest.raises(PassError) as info:
        run_passes(mlp(), [(Step("A", log), {}), (Step("B", log, requires=("C",)), {})])
    assert (info.value.pass_name, info.value.prior_passes) == ("B", ["A"])
    assert "requires C" in str(info.value)
    assert log == [("A", {})]


def test_a_failure_is_wrapped_with_the_pass_name_and_the_passes_before_it():
    def boom(graph):
        raise RuntimeError("the tensor is on fire")

    with pytest.raises(PassError) as info:
        run_passes(mlp(), [(Step("A"), {}), (Step("B"), {}), (Step("Boom", body=boom), {}),
                           (Step("Never"), {})])  # fmt: skip
    err = info.value
    assert err.pass_name == "Boom"
    assert err.prior_passes == ["A", "B"]
    assert isinstance(err.__cause__, RuntimeError)
    assert "pass 'Boom' failed (after: A, B): RuntimeError: the tensor is on fire" in str(err)


def test_graphprune_errors_propagate_unchanged():
    pg = mlp()
    with pytest.raises(ConfigError, match="no group 99"):
        run_passes(pg, [(BuildCoupling(), {}), (PlanRemoval(), {"removal": {99: [0]}})])


def test_a_pass_that_corrupts_the_graph_is_named_when_verifying():
    def corrupt(graph):
        graph.weights.pop(next(iter(graph.weights)))

    pipeline = [(BuildCoupling(), {}), (Step("Corrupt", body=corrupt), {}), (Step("After"), {})]
    with pytest.raises(PassError) as info:
        run_passes(mlp(), pipeline, verify=True)
    assert (info.value.pass_name, info.value.prior_passes) == ("Corrupt", ["BuildCoupling"])
    assert isinstance(info.value.__cause__, VerificationError)
    assert "names weight" in str(info.value)
    assert list(run_passes(mlp(), pipeline)) == ["BuildCoupling", "Corrupt", "After"]  # unverified


def test_a_corrupted_input_fails_verification_before_any_pass():
    pg = mlp()
    name = next(iter(pg.weights))
    pg.masks[name] = np.ones((1, 1), dtype=bool)
    log: list = []
    with pytest.raises(VerificationError, match=f"mask of '{name}' has shape"):
        run_passes(pg, [(Step("A", log), {})], verify=True)
    assert log == []


def test_prune_pipeline_leaves_its_input_unchanged():
    model, inputs = models.get("resnet_tiny")
    pg = gp.capture(model, inputs)
    before = fingerprint(pg)
    out = run_passes(pg, [
        (BuildCoupling(), {}),
        (PruneChannels(), {"config": PruneConfig(ratio=0.5)}),
        (PlanRemoval(), lambda r: {"removal": r["PruneChannels"].value.removal}),
    ], verify=True)  # fmt: skip
    assert fingerprint(pg) == before
    assert out["PlanRemoval"].value.new_shapes  # the passes did plan a change
    name = next(iter(pg.weights))
    pg.weights[name] = pg.weights[name] + 1.0  # and the fingerprint sees a change
    assert fingerprint(pg) != before


def test_pass_results_say_whether_they_change_the_model():
    pg = mlp()
    out = run_passes(pg, [
        (BuildCoupling(), {}),
        (PruneChannels(), {"config": PruneConfig(ratio=0.5)}),
        (PlanRemoval(), lambda r: {"removal": r["PruneChannels"].value.removal}),
    ])  # fmt: skip
    assert out["BuildCoupling"].changed is False
    assert out["BuildCoupling"].report == {"groups": 3, "prunable": 1}
    assert out["PruneChannels"].changed and out["PruneChannels"].report["indices"] == 4
    assert out["PlanRemoval"].changed and out["PlanRemoval"].report["groups"] == 1
    none = run_passes(pg, [
        (BuildCoupling(), {}),
        (PruneChannels(), {"config": PruneConfig(ratio=0.0)}),
        (PlanRemoval(), {"removal": {}}),
    ])  # fmt: skip
    assert not none["PruneChannels"].changed and not none["PlanRemoval"].changed


def test_gp_prune_names_the_pass_a_criterion_fails_in():
    def bad_criterion(ctx, group):
        raise ZeroDivisionError("scores of nothing")

    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(PassError) as info:
        gp.prune(m, (torch.randn(2, 4),), criterion=bad_criterion)
    assert (info.value.pass_name, info.value.prior_passes) == ("PruneChannels", ["BuildCoupling"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def bad_grouped_conv() -> PruneGraph:
    #  x (2, 8, 5, 5) ─ conv(groups=2, w (8, 3, 3, 3)) ─ y: 8 input channels are not 2 × 3
    pg = PruneGraph("torch", "by hand", "bad_conv")
    pg.add_value("x", Value((2, 8, 5, 5), "float32", "input"))
    pg.add_value("w", Value((8, 3, 3, 3), "float32", "param", param="conv.weight"))
    pg.add_value("y", Value((2, 8, 3, 3), "float32", "output"))
    pg.weights["conv.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    pg.add_op("conv", OpNode("conv", "aten.conv2d.default", {"groups": 2}), ["x", "w"], ["y"])
    pg.inputs, pg.outputs = ["x"], ["y"]
    return pg


def test_coupling_contradiction_raises_coupling_error_naming_the_op():
    pg = bad_grouped_conv()
    with pytest.raises(CouplingError) as info:
        run_passes(pg, [(BuildCoupling(), {})], verify=True)  # the IR itself is well formed
    msg = str(info.value)
    assert "op 'conv' (conv, aten.conv2d.default)" in msg
    assert "size 8 is stated to be the row-major product of axes of sizes [2, 3]" in msg
    assert "x [2, 8, 5, 5], w [8, 3, 3, 3]" in msg


def test_coupling_contradiction_in_a_unify():
    pg = bad_grouped_conv()
    pg.nx.nodes["w"]["data"] = Value((6, 4, 3, 3), "float32", "param", param="conv.weight")
    pg.weights["conv.weight"] = np.zeros((6, 4, 3, 3), np.float32)
    for _, _, d in pg.nx.in_edges("conv", data=True):
        if d["slot"] == 1:
            d["shape"] = (6, 4, 3, 3)
    # 8 = 2 × 4 in, but 6 weight rows for 8 output channels
    with pytest.raises(CouplingError, match=r"op 'conv'.*axes of sizes 8 and 6 are stated to "):
        run_passes(pg, [(BuildCoupling(), {})], verify=True)


def test_one_rule_per_op_kind():
    with pytest.raises(ValueError, match="op kind 'add' has two coupling rules"):
        coupling_rule("add")(lambda c: None)
    with pytest.raises(ValueError, match="'addd': not an IR op kind"):
        coupling_rule("addd")(lambda c: None)
