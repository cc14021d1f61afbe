"""BuildCoupling golden tests: small graphs, their expected groups written inline.

Each test states the groups as {(param, axis, block)} member sets. ``block`` is how many
positions along that axis one group index covers (1 for a channel, head_dim for a head...).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune import models
from graphprune.testing.oracle import run_oracle
from graphprune.passes.coupling import build_coupling


def prunable(pg: gp.PruneGraph) -> list[set[tuple[str, int, int]]]:
    return [{(m.param, m.axis, m.block) for m in g.params} for g in build_coupling(pg).groups if g.prunable]


def oracle_all(pg: gp.PruneGraph) -> None:
    for g in build_coupling(pg).groups:
        if g.prunable:
            run_oracle(pg, g.id).assert_close(atol=1e-5, rtol=1e-5)


class Residual(nn.Module):
    #  x ─ fc1 ─┬─ relu ─ fc2 ─┐
    #           └──────────────add ─ fc3 ─ out
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        a = self.fc1(x)
        return self.fc3(a + self.fc2(torch.relu(a)))


def test_residual_add_unions_producers_and_consumers():
    pg = gp.capture(Residual().eval(), (torch.randn(2, 4),))
    assert prunable(pg) == [{("fc1.weight", 0, 1), ("fc1.bias", 0, 1), ("fc2.weight", 0, 1),
                             ("fc2.bias", 0, 1), ("fc2.weight", 1, 1), ("fc3.weight", 1, 1)}]
    oracle_all(pg)


class CatConv(nn.Module):
    #  x ─ a(4) ─┐
    #  x ─ b(6) ─cat(10) ─ c
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_cat_offsets_each_input_into_the_consumer():
    pg = gp.capture(CatConv().eval(), (torch.randn(2, 3, 4, 4),))
    groups = prunable(pg)
    assert {("a.weight", 0, 1), ("c.weight", 1, 1)} <= groups[0]
    assert {("b.weight", 0, 1), ("c.weight", 1, 1)} <= groups[1]
    assert [g.size for g in build_coupling(pg).groups if g.prunable] == [4, 6]
    oracle_all(pg)


class Grouped(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.g(self.a(x)))


def test_grouped_conv_splits_into_whole_groups_and_per_group_channels():
    pg = gp.capture(Grouped(4).eval(), (torch.randn(2, 3, 4, 4),))
    sizes = sorted((g.size, g.granularity) for g in build_coupling(pg).groups if g.prunable)
    # 4 conv groups (each removes 2 input channels of g), 2 in-channels per group (each removes 4:
    # one per group), 2 out-channels per group of g.
    assert sizes == [(2, 4), (2, 4), (4, 2)]
    oracle_all(pg)


def test_depthwise_conv_couples_input_and_output_channels():
    pg = gp.capture(Grouped(8).eval(), (torch.randn(2, 3, 4, 4),))
    (g,) = [g for g in build_coupling(pg).groups if g.prunable]
    assert {("a.weight", 0, 1), ("g.weight", 0, 1), ("c.weight", 1, 1)} <= {
        (m.param, m.axis, m.block) for m in g.params}
    oracle_all(pg)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        y = y.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.c(y)


def test_channel_shuffle_maps_indices_through_the_transpose():
    pg = gp.capture(Shuffle().eval(), (torch.randn(2, 3, 4, 4),))
    assert sorted(g.size for g in build_coupling(pg).groups if g.prunable) == [2, 4]
    oracle_all(pg)


class Chunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(4, 2)

    def forward(self, x):
        p, q = self.a(x).chunk(2, -1)
        return self.c(p * torch.sigmoid(q))  # GLU: chunk halves stay equal


def test_chunk_removes_the_same_channel_from_every_chunk():
    pg = gp.capture(Chunked().eval(), (torch.randn(2, 4),))
    (g,) = [g for g in build_coupling(pg).groups if g.prunable]
    assert g.size == 4
    assert {(m.param, m.axis, m.block) for m in g.params} == {
        ("a.weight", 0, 2), ("a.bias", 0, 2), ("c.weight", 1, 1)}
    frozen = [g for g in build_coupling(pg).groups if g.frozen_reason and "number of chunks" in g.frozen_reason]
    assert frozen and frozen[0].size == 2
    oracle_all(pg)


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.cumsum(self.a(x), dim=-1))


def test_an_op_without_a_rule_freezes_what_flows_through_it():
    pg = gp.capture(Opaque().eval(), (torch.randn(2, 4),))
    assert not [g for g in build_coupling(pg).groups if g.prunable]
    reasons = " ".join(g.frozen_reason for g in build_coupling(pg).groups)
    assert "not in the coupling table at cumsum (aten.cumsum.default)" in reasons


def test_gqa_keeps_query_heads_with_their_kv_group():
    model, x = models.get("hf_llama_tiny")
    pg = gp.capture(model, x)
    by_q = {}
    for g in build_coupling(pg).groups:
        for m in g.params:
            if m.param == "model.model.layers.0.self_attn.q_proj.weight" and m.axis == 0:
                by_q[(g.size, m.block, g.prunable)] = g
    # 2 kv heads, each with 2 query heads of head_dim 16: a kv group removes 32 rows of q_proj.
    kv = by_q[(2, 32, True)]
    assert {("model.model.layers.0.self_attn.k_proj.weight", 0, 16),
            ("model.model.layers.0.self_attn.v_proj.weight", 0, 16),
            ("model.model.layers.0.self_attn.o_proj.weight", 1, 32)} <= {
        (m.param, m.axis, m.block) for m in kv.params}
    # The query heads inside a kv group cannot go alone (the kv head is expanded to them).
    rep = [g for g in by_q.values() if g.frozen_reason and "expand" in g.frozen_reason]
    assert rep
    run_oracle(pg, kv.id).assert_close(atol=1e-5, rtol=1e-4)


def test_vit_heads_are_groups_of_whole_heads():
    model, x = models.get("vit_tiny")
    pg = gp.capture(model, x)
    heads = [g for g in build_coupling(pg).groups if g.prunable and g.size == 4]
    assert heads and all(g.granularity == 48 for g in heads)  # q, k, v rows of one head: 3 x 16
    cls = [g for g in build_coupling(pg).groups if g.frozen_reason and "indexed by position" in g.frozen_reason]
    assert cls  # the class token position is read with x[:, 0]


def test_tied_embedding_and_head_share_one_group():
    model, x = models.get("llama_tiny_tied")
    pg = gp.capture(model, x)
    hidden = next(g for g in build_coupling(pg).groups if any(m.param == "lm_head.weight" and m.axis == 1
                                                 for m in g.params))  # fmt: skip
    assert hidden.prunable and not hidden.exact  # RMSNorm statistics run over it
    # One parameter for both uses: the embedding's columns and the head's in-features are one
    # tensor, so the group holds it once, under one of its two names, on its hidden axis ...
    names = pg.param_names("lm_head.weight")
    assert set(names) == {"lm_head.weight", "embed_tokens.weight"}
    assert [(m.param, m.axis) for m in hidden.params if m.param in names] == [("lm_head.weight", 1)]
    # ... and it is counted once, as model.parameters() counts it
    assert gp.passes.cost.count(pg).params == sum(p.numel() for p in model.parameters())
    run_oracle(pg, hidden.id).assert_close(atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["unet_tiny", "densenet_tiny"])
def test_explain_prints_every_group(name):
    model, x = models.get(name)
    pg = gp.capture(model, x)
    text = gp.explain(pg)
    assert f"{len(build_coupling(pg).groups)} groups" in text
    assert "frozen" in text and "prunable" in text
