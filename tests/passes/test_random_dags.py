"""Property tests on random DAGs, for every generator variant:

* ``cnn``: conv / grouped conv / depthwise conv / BN / residual add / cat / chunk / uneven split /
  channel slice, ending in global pooling or a flatten into a Linear;
* ``seq``: Linear / multi-head attention / grouped-query attention (kv heads repeated to the
  query heads) / residual add / cat / chunk / split / slice on the features, ending in a mean
  over tokens or a flatten into a Linear.

Properties: every prunable group passes the dead-channel oracle; ratio 0 is the identity; pruning
leaves its input unchanged (the user's weights and the captured graph). A model the capture
refuses with a graphprune error is rejected (``hypothesis.reject``), never passed: if the
refusals were systematic, Hypothesis' ``filter_too_much`` health check fails the test (checked
below by :func:`test_systematic_refusal_fails_the_property`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import fingerprint
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck
from torch import nn

import graphprune as gp
from graphprune.passes.coupling import build_coupling
from graphprune.testing.oracle import run_oracle

# The CI profile (conftest) is derandomised with deadline=None; 15 examples per variant and
# property keep this file near 30 s on one core.
PROPERTY = settings(max_examples=15, deadline=None)
SPATIAL = 4  # CNN inputs are (2, 3, 4, 4); every conv keeps 4x4 (padding k // 2, k odd)
TOKENS = 5  # sequence inputs are (2, 5, 8)


def _split_sizes(c: int, first: int) -> list[int]:
    return [first, c - first]


class ConvDAG(nn.Module):
    """Runs ``spec``, a list of (op, *args) over a growing list of tensors (t[0] is the input),
    then ``head``: ``pool`` (global mean, Linear) or ``flatten`` (flatten C x H x W, Linear)."""

    def __init__(self, spec: list[tuple], in_ch: int, head: str):
        super().__init__()
        self.spec, self.head_kind = spec, head
        self.mods = nn.ModuleDict()
        ch = [in_ch]
        for i, (op, *a) in enumerate(spec):
            if op in ("conv", "gconv"):
                src, out, k, g = a
                self.mods[str(i)] = nn.Conv2d(ch[src], out, k, padding=k // 2, groups=g)
                ch.append(out)
            elif op == "dwconv":
                src, mult, k = a
                self.mods[str(i)] = nn.Conv2d(ch[src], mult * ch[src], k, padding=k // 2,
                                              groups=ch[src])  # fmt: skip
                ch.append(mult * ch[src])
            elif op == "bn":
                self.mods[str(i)] = nn.BatchNorm2d(ch[a[0]])
                with torch.no_grad():
                    self.mods[str(i)].running_mean.uniform_(-1, 1)
                    self.mods[str(i)].bias.uniform_(-1, 1)
                ch.append(ch[a[0]])
            elif op == "add":
                ch.append(ch[a[0]])
            elif op == "cat":
                ch.append(ch[a[0]] + ch[a[1]])
            elif op == "chunk":
                ch += [ch[a[0]] // 2, ch[a[0]] // 2]
            elif op == "split":
                ch += _split_sizes(ch[a[0]], a[1])
            elif op == "slice":
                ch.append(a[2] - a[1])
        width = ch[-1] * (SPATIAL * SPATIAL if head == "flatten" else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        t = [x]
        for i, (op, *a) in enumerate(self.spec):
            if op in ("conv", "gconv", "dwconv"):
                t.append(self.mods[str(i)](t[a[0]]))
            elif op == "bn":
                t.append(torch.relu(self.mods[str(i)](t[a[0]])))
            elif op == "add":
                t.append(t[a[0]] + t[a[1]])
            elif op == "cat":
                t.append(torch.cat([t[a[0]], t[a[1]]], 1))
            elif op == "chunk":
                t.extend(t[a[0]].chunk(2, 1))
            elif op == "split":
                t.extend(t[a[0]].split(_split_sizes(t[a[0]].shape[1], a[1]), 1))
            elif op == "slice":
                t.append(t[a[0]][:, a[1] : a[2]])
        y = t[-1].flatten(1) if self.head_kind == "flatten" else t[-1].mean((2, 3))
        return self.head(y)


class SeqDAG(nn.Module):
    """Token-sequence DAGs: Linear, residual add, cat/chunk/split/slice on features, multi-head
    attention (reshape to heads, SDPA, reshape back) and grouped-query attention (``kv`` key/value
    heads, each repeated to ``heads // kv`` query heads as ``transformers``' ``repeat_kv`` does),
    then ``head``: ``mean`` (Linear, mean over tokens) or ``flatten`` (tokens x features, Linear).
    """

    def __init__(self, spec: list[tuple], dim: int, head: str):
        super().__init__()
        self.spec, self.head_kind = spec, head
        self.mods = nn.ModuleDict()
        ch = [dim]
        for i, (op, *a) in enumerate(spec):
            if op == "linear":
                self.mods[str(i)] = nn.Linear(ch[a[0]], a[1])
                ch.append(a[1])
            elif op == "attn":
                self.mods[str(i)] = nn.ModuleList([nn.Linear(ch[a[0]], ch[a[0]]) for _ in range(4)])
                ch.append(ch[a[0]])
            elif op == "gqa":
                src, heads, kv, d = a
                c = ch[src]
                self.mods[str(i)] = nn.ModuleList([
                    nn.Linear(c, heads * d), nn.Linear(c, kv * d), nn.Linear(c, kv * d),
                    nn.Linear(heads * d, c)])  # fmt: skip
                ch.append(c)
            elif op == "add":
                ch.append(ch[a[0]])
            elif op == "cat":
                ch.append(ch[a[0]] + ch[a[1]])
            elif op == "chunk":
                ch += [ch[a[0]] // 2] * 2
            elif op == "split":
                ch += _split_sizes(ch[a[0]], a[1])
            elif op == "slice":
                ch.append(a[2] - a[1])
        self.head = nn.Linear(ch[-1] * (TOKENS if head == "flatten" else 1), 3)

    def forward(self, x):
        t = [x]
        for i, (op, *a) in enumerate(self.spec):
            if op == "linear":
                t.append(torch.relu(self.mods[str(i)](t[a[0]])))
            elif op == "attn":
                t.append(self._mha(self.mods[str(i)], t[a[0]], a[1]))
            elif op == "gqa":
                t.append(self._gqa(self.mods[str(i)], t[a[0]], *a[1:]))
            elif op == "add":
                t.append(t[a[0]] + t[a[1]])
            elif op == "cat":
                t.append(torch.cat([t[a[0]], t[a[1]]], -1))
            elif op == "chunk":
                t.extend(t[a[0]].chunk(2, -1))
            elif op == "split":
                t.extend(t[a[0]].split(_split_sizes(t[a[0]].shape[-1], a[1]), -1))
            elif op == "slice":
                t.append(t[a[0]][..., a[1] : a[2]])
        if self.head_kind == "flatten":
            return self.head(t[-1].flatten(1))
        return self.head(t[-1]).mean(1)

    @staticmethod
    def _mha(mods: nn.ModuleList, x: torch.Tensor, h: int) -> torch.Tensor:
        q, k, v, o = mods
        b, n, c = x.shape

        def split(y):
            return y.reshape(b, n, h, c // h).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(q(x)), split(k(x)), split(v(x)))
        return x + o(y.transpose(1, 2).reshape(b, n, c))

    @staticmethod
    def _gqa(mods: nn.ModuleList, x: torch.Tensor, heads: int, kv: int, d: int) -> torch.Tensor:
        q_proj, k_proj, v_proj, o_proj = mods
        b, n, _ = x.shape
        q = q_proj(x).reshape(b, n, heads, d).transpose(1, 2)

        def repeat_kv(y):
            y = y.reshape(b, n, kv, d).transpose(1, 2)
            return y[:, :, None].expand(b, kv, heads // kv, n, d).reshape(b, heads, n, d)

        y = nn.functional.scaled_dot_product_attention(q, repeat_kv(k_proj(x)),
                                                       repeat_kv(v_proj(x)))  # fmt: skip
        return x + o_proj(y.transpose(1, 2).reshape(b, n, heads * d))


@dataclass(frozen=True)
class Case:
    """One generated model: its variant, spec, head and seed (what a failure prints)."""

    variant: str
    spec: tuple
    head: str
    seed: int

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor]]:
        torch.manual_seed(self.seed)
        if self.variant == "cnn":
            x = torch.randn(2, 3, SPATIAL, SPATIAL)
            return ConvDAG(list(self.spec), 3, self.head).eval(), (x,)
        return SeqDAG(list(self.spec), 8, self.head).eval(), (torch.randn(2, TOKENS, 8),)


CNN_OPS = ["conv", "gconv", "dwconv", "bn", "add", "cat", "chunk", "split", "slice"]
SEQ_OPS = ["linear", "attn", "gqa", "add", "cat", "chunk", "split", "slice"]


def _source(draw, ch: list[int], fits) -> int | None:
    """One of the two newest tensors ``fits`` accepts (by channel count), so that most ops lie on
    the path to the output instead of in dead branches; None if there is none. The model input
    (t[0]) only feeds the first op."""
    cands = [i for i in range(len(ch)) if (i > 0 or len(ch) == 1) and fits(ch[i])]
    return draw(st.sampled_from(cands[-2:])) if cands else None


def _shared_op(draw, op: str, ch: list[int]) -> tuple | None:
    """add / cat / chunk / split / slice, the same on channels (CNN) and features (seq)."""
    if op == "add":
        src = _source(draw, ch, lambda c: ch[1:].count(c) > 1)
        if src is None:
            return None
        return ("add", src, draw(st.sampled_from([i for i in range(1, len(ch))
                                                  if ch[i] == ch[src] and i != src])))  # fmt: skip
    if op == "cat" and len(ch) > 1:
        return ("cat", _source(draw, ch, lambda c: True), draw(st.integers(1, len(ch) - 1)))
    if op == "chunk":
        src = _source(draw, ch, lambda c: c % 2 == 0)
        return None if src is None else ("chunk", src)
    if op == "split":
        src = _source(draw, ch, lambda c: c >= 2)
        return None if src is None else ("split", src, draw(st.integers(1, ch[src] - 1)))
    if op == "slice":
        src = _source(draw, ch, lambda c: c >= 2)
        if src is None:
            return None
        start = draw(st.integers(0, ch[src] - 1))
        return ("slice", src, start, draw(st.integers(start + 1, ch[src])))
    return None


def _shared_widths(step: tuple, ch: list[int]) -> list[int]:
    op, src, *a = step
    if op == "cat":
        return [ch[src] + ch[a[0]]]
    if op == "chunk":
        return [ch[src] // 2] * 2
    if op == "split":
        return _split_sizes(ch[src], a[0])
    if op == "slice":
        return [a[1] - a[0]]
    return [ch[src]]  # add


@st.composite
def cnn_cases(draw) -> Case:
    ch, spec = [3], []
    for _ in range(draw(st.integers(2, 7))):
        op = draw(st.sampled_from(CNN_OPS))
        step = _shared_op(draw, op, ch)
        if step is not None:
            ch += _shared_widths(step, ch)
        elif op == "gconv" and (src := _source(draw, ch, lambda c: c % 2 == 0)) is not None:
            step = ("gconv", src, 2 * draw(st.integers(1, 4)), draw(st.sampled_from([1, 3])), 2)
            ch.append(step[2])
        elif op == "dwconv" and (src := _source(draw, ch, lambda c: True)) is not None:
            step = ("dwconv", src, draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])))
            ch.append(step[2] * ch[src])
        elif op == "bn" and (src := _source(draw, ch, lambda c: True)) is not None:
            step = ("bn", src)
            ch.append(ch[src])
        else:
            src = _source(draw, ch, lambda c: True)
            step = ("conv", src, draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([1, 3])), 1)
            ch.append(step[2])
        spec.append(step)
    head = draw(st.sampled_from(["pool", "flatten"]))
    return Case("cnn", tuple(spec), head, draw(st.integers(0, 3)))


def _heads(width: int) -> list[int]:
    """Head counts that split ``width`` into heads of at least 2 features."""
    return [h for h in (1, 2, 4) if width % h == 0 and width // h >= 2]


@st.composite
def seq_cases(draw) -> Case:
    ch, spec = [8], []
    for _ in range(draw(st.integers(2, 6))):
        op = draw(st.sampled_from(SEQ_OPS))
        step = _shared_op(draw, op, ch)
        if step is not None:
            ch += _shared_widths(step, ch)
        elif op == "attn" and (src := _source(draw, ch, _heads)) is not None:
            step = ("attn", src, draw(st.sampled_from(_heads(ch[src]))))
            ch.append(ch[src])
        elif op == "gqa" and (src := _source(draw, ch, lambda c: True)) is not None:
            kv = draw(st.sampled_from([1, 2]))
            step = ("gqa", src, kv * draw(st.sampled_from([1, 2, 3])), kv,
                    draw(st.sampled_from([2, 4])))  # fmt: skip
            ch.append(ch[src])
        else:
            step = ("linear", _source(draw, ch, lambda c: True), draw(st.sampled_from([4, 6, 8])))
            ch.append(step[2])
        spec.append(step)
    head = draw(st.sampled_from(["mean", "flatten"]))
    return Case("seq", tuple(spec), head, draw(st.integers(0, 3)))


VARIANTS = {"cnn": cnn_cases(), "seq": seq_cases()}

# Every op kind and head of both generators at least once, whatever the random draws hit.
COVERAGE = [
    Case("cnn", (("conv", 0, 4, 3, 1), ("bn", 1), ("dwconv", 2, 2, 3), ("gconv", 3, 4, 1, 2),
                 ("add", 4, 1), ("chunk", 5), ("cat", 6, 7)), "pool", 0),
    Case("cnn", (("conv", 0, 6, 1, 1), ("split", 1, 2), ("conv", 3, 6, 3, 1), ("slice", 4, 1, 5),
                 ("dwconv", 5, 1, 3)), "flatten", 1),
    Case("seq", (("linear", 0, 8), ("attn", 1, 2), ("gqa", 2, 4, 2, 2), ("add", 3, 1),
                 ("chunk", 4), ("cat", 5, 6)), "mean", 0),
    Case("seq", (("gqa", 0, 3, 1, 4), ("split", 1, 3), ("cat", 3, 2), ("slice", 4, 1, 7),
                 ("linear", 5, 6)), "flatten", 2),
]


def _capture(case: Case):
    model, x = case.build()
    try:
        return model, x, gp.capture(model, x)
    except gp.GraphPruneError:
        reject()  # refused, not passed: systematic refusal fails the health check


def _outputs(model: nn.Module, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


def check_oracle(model: nn.Module, x: tuple, pg: gp.PruneGraph, case: Case) -> None:
    """Every prunable group, removed alone, computes what its dead-channel reference computes."""
    for g in build_coupling(pg).groups:
        if g.prunable:
            run_oracle(pg, g.id, seed=case.seed).assert_close(atol=1e-4, rtol=1e-4)


def check_ratio_zero(model: nn.Module, x: tuple, pg: gp.PruneGraph, case: Case) -> None:
    """Pruning at ratio 0 removes nothing and computes what the model computes."""
    res = gp.prune(model, x, ratio=0.0, graph=pg)
    assert not any(res.selection.removal.values())
    assert res.report.params_after == res.report.params_before
    torch.testing.assert_close(_outputs(res.model, x), _outputs(model, x), atol=1e-6, rtol=0)


def check_input_unchanged(model: nn.Module, x: tuple, pg: gp.PruneGraph, case: Case) -> None:
    """Pruning (or refusing to: nothing prunable) leaves the user's weights and the graph alone."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    graph, out = fingerprint(pg), _outputs(model, x)
    if any(g.prunable for g in build_coupling(pg).groups):
        res = gp.prune(model, x, ratio=0.5, graph=pg)
        assert res.model is not model
        assert res.report.params_after < res.report.params_before  # it did prune
    else:
        with pytest.raises(gp.ConfigError, match="nothing can be pruned"):
            gp.prune(model, x, ratio=0.5, graph=pg)
    assert fingerprint(pg) == graph
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(_outputs(model, x), out, atol=0, rtol=0)


CHECKS = [check_oracle, check_ratio_zero, check_input_unchanged]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@PROPERTY
@given(data=st.data())
def test_random_dag_property(check, variant, data):
    case = data.draw(VARIANTS[variant], label="case")
    check(*_capture(case), case)


@pytest.mark.parametrize("case", COVERAGE, ids=lambda c: f"{c.variant}-{c.head}")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_every_op_kind_has_the_properties(check, case):
    model, x = case.build()
    pg = gp.capture(model, x)
    assert any(g.prunable for g in build_coupling(pg).groups)
    check(model, x, pg, case)


def test_a_weight_on_two_axes_of_one_group_can_be_scored():
    case = Case("cnn", (("conv", 0, 2, 1, 1), ("cat", 1, 1), ("conv", 1, 4, 1, 1), ("add", 2, 3)),
                "pool", 0)  # fmt: skip
    model, x = case.build()
    pg = gp.capture(model, x)
    """Found by these properties: a group whose channels reach one conv weight on two axes (x and
    cat(x, x) both read by it) crashed the l1/l2 scores (member values keyed by value id, not
    (value, axis)). Every criterion without calibration now scores it."""
    check_oracle(model, x, pg, case)
    check_ratio_zero(model, x, pg, case)
    for name in ("l1", "l2", "fpgm", "random"):
        res = gp.prune(model, x, ratio=0.5, criterion=name)
        assert res.report.params_after < res.report.params_before, name


def test_coverage_names_every_op_kind_and_head():
    seen = {(c.variant, step[0]) for c in COVERAGE for step in c.spec}
    assert seen == {("cnn", op) for op in CNN_OPS} | {("seq", op) for op in SEQ_OPS}
    assert {(c.variant, c.head) for c in COVERAGE} == {("cnn", "pool"), ("cnn", "flatten"),
                                                        ("seq", "mean"), ("seq", "flatten")}


def test_systematic_refusal_fails_the_property():
    """The rejection above cannot hide a capture that always fails: under the settings these
    properties run with, a test whose every example is rejected fails Hypothesis' health check."""

    @PROPERTY
    @given(case=VARIANTS["cnn"])
    def always_refused(case):
        reject()

    with pytest.raises(FailedHealthCheck):
        always_refused()
    assert HealthCheck.filter_too_much not in (PROPERTY.suppress_health_check or ())
