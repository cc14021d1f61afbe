"""Bad options and bad calibration batches: a ConfigError naming the option (or batch and input),
the value and what to pass, raised before any work; never a TypeError or a torch guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.ir.errors import ConfigError


class Counting(torch.nn.Module):
    """A small MLP that counts its forward calls: a check that ran before capture leaves 0."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(torch.relu(self.fc1(x)))


X = (torch.randn(2, 8),)

PRUNE_CASES = [
    ({"ratio": "abc"}, r"ratio='abc' \(str\): pass a number in \[0, 1\)"),
    ({"ratio": None}, r"ratio=None: pass the fraction .* target_macs="),
    ({"ratio": math.nan}, r"ratio=nan is not finite"),
    ({"ratio": 1.0}, r"ratio=1.0 is outside \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio=-0.1 is outside"),
    ({"ratio": True}, r"ratio=True \(bool\)"),
    ({"target_macs": "x"}, r"target_macs='x' \(str\): pass a number in \(0, 1\]"),
    ({"target_params": 0.0}, r"target_params=0.0 is outside \(0, 1\]"),
    ({"target_params": math.inf}, r"target_params=inf is not finite"),
    ({"min_keep": None}, r"min_keep=None \(NoneType\): pass a number in \[0, 1\]"),
    ({"min_keep": 1.5}, r"min_keep=1.5 is outside \[0, 1\]"),
    ({"round_to": 2.5}, r"round_to=2.5 \(float\): pass an integer >= 1"),
    ({"round_to": "4"}, r"round_to='4' \(str\)"),
    ({"round_to": 0}, r"round_to=0 \(int\): pass an integer >= 1"),
    ({"ratios": {"fc1": "a"}}, r"ratios\['fc1'\]='a' \(str\)"),
    ({"ratios": {"fc1": math.nan}}, r"ratios\['fc1'\]=nan is not finite"),
    ({"ratios": [0.3]}, r"ratios=\[0.3\]: pass a dict"),
    ({"ignore": "fc*"}, r"ignore='fc\*': pass a list of name globs"),
    ({"ignore": [1]}, r"ignore holds 1 \(int\)"),
    ({"seed": "a"}, r"seed='a' \(str\): pass an integer"),
    ({"heads": "yes"}, r"heads='yes' \(str\): pass True or False"),
    ({"inplace": 1}, r"inplace=1 \(int\): pass True or False"),
    ({"uniform": "no"}, r"uniform='no' \(str\): pass True or False or None"),
    ({"drop_blocks": -1}, r"drop_blocks=-1 \(int\): pass an integer >= 0"),
    ({"drop_blocks": "a"}, r"drop_blocks='a'"),
    ({"criterion": 3}, r"criterion=3 \(int\): pass a name"),
    ({"scope": None}, r"scope=None: use 'local' or 'global'"),
    ({"depth_unit": "block"}, r"depth_unit='block': use 'branch' or 'layer'"),
    ({"loss_fn": "mse"}, r"loss_fn='mse' is not callable"),
    ({"calib": "data.npz"}, r"calib=str: pass a list"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, message", PRUNE_CASES)
def test_prune_refuses_bad_options_before_any_work(kwargs, message):
    m = Counting()
    with pytest.raises(ConfigError, match=message):
        gp.prune(m, X, **kwargs)
    assert m.calls == 0  # nothing was captured or run


def test_prune_accepts_numpy_numbers_and_ratio_none_with_a_target():
    m = Counting()
    res = gp.prune(m, X, ratio=np.float64(0.5), round_to=np.int64(2), min_keep=np.float32(0.1))
    assert res.model.fc1.out_features == 8
    res = gp.prune(m, X, ratio=None, target_params=0.6)
    assert res.report.params_after < res.report.params_before


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": "abc"}, r"sparsity='abc' must be a number in \[0, 1\)"),
    ({"sparsity": math.nan}, r"sparsity=nan"),
    ({"seed": "a"}, r"seed='a' \(str\): pass an integer"),
    ({"inplace": "yes"}, r"inplace='yes' \(str\): pass True or False"),
    ({"min_keep": math.nan}, r"min_keep=nan must be a fraction"),
])  # fmt: skip
def test_sparsify_refuses_bad_options_before_any_work(kwargs, message):
    m = Counting()
    with pytest.raises(ConfigError, match=message):
        gp.sparsify(m, X, **kwargs)
    assert m.calls == 0


@pytest.mark.parametrize("ratio, kwargs, message", [
    ("abc", {}, r"ratio='abc' \(str\)"),
    (None, {}, r"ratio=None: pass the final fraction"),
    (math.nan, {}, r"ratio=nan is not finite"),
    (0.5, {"steps": "3"}, r"steps='3' \(str\): pass an integer >= 1"),
    (0.5, {"steps": 2.5}, r"steps=2.5 \(float\)"),
    (0.5, {"schedule": "cubic"}, r"schedule='cubic': use 'linear' or 'agp'"),
    (0.5, {"fine_tune": 3}, r"fine_tune=3 is not callable"),
    (0.5, {"round_to": "8"}, r"round_to='8' \(str\)"),
    (0.5, {"target_macs": 0.5}, r"drop target_macs="),
    (0.5, {"critrion": "l1"}, r"got \['critrion'\], which gp.prune does not take"),
])  # fmt: skip
def test_prune_iteratively_refuses_bad_options_before_any_work(ratio, kwargs, message):
    m = Counting()
    with pytest.raises(ConfigError, match=message):
        gp.prune_iteratively(m, X, ratio, **kwargs)
    assert m.calls == 0


@pytest.mark.parametrize("criterion", ["taylor", "activation"])
@pytest.mark.parametrize("batch, message", [
    ((torch.randn(2, 9),), (r"calibration batch 1 does not run through the captured model: "
                            r"input 0 \('\w+'\): expected \(2, 8\) float32 \(as captured\), "
                            r"got \(2, 9\) float32 .*Pass batches shaped like example_inputs")),
    ((torch.randn(2, 8, 1),), (r"calibration batch 1, input 0 \('\w+'\): expected rank 2 .* "
                               r"got rank 3 \(shape \(2, 8, 1\)\)")),
    ((torch.ones(2, 8, dtype=torch.int64),), (r"calibration batch 1, input 0 \('\w+'\): "
                                              r"expected dtype float32 .* got int64")),
    ((), r"calibration batch 1 holds 0 item\(s\), but the model was captured with 1 inputs"),
    ((torch.randn(3, 8),), r"calibration batch 1 has size 3: .* multiple of 2 rows"),
])  # fmt: skip
def test_calibration_batch_of_the_wrong_shape_is_named(criterion, batch, message):
    calib = [(torch.randn(2, 8),), batch]
    with pytest.raises(ConfigError, match=message):
        gp.prune(Counting(), X, ratio=0.5, criterion=criterion, calib=calib)


def test_calibration_batch_of_a_multiple_of_the_batch_still_runs():
    res = gp.prune(Counting(), X, ratio=0.5, criterion="taylor", calib=[(torch.randn(4, 8),)])
    assert res.model.fc1.out_features == 8


class ArgmaxHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).argmax(-1)


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradient_criterion_on_a_model_without_a_loss_says_what_to_pass(criterion):
    with pytest.raises(ConfigError, match="need a loss.*loss_fn=lambda out, batch"):
        gp.prune(ArgmaxHead(), X, ratio=0.5, criterion=criterion, calib=[X])
