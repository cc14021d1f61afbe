"""Property tests: random DAGs of conv / grouped conv / add / cat / chunk / BN blocks.

Every generated model either passes the dead-channel oracle on every prunable group, or is
refused with a graphprune error; ratio 0 is the identity; the user's model is left untouched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import graphprune as gp
from graphprune.testing.oracle import run_oracle
from graphprune.passes.coupling import build_coupling


class DAG(nn.Module):
    """Runs ``spec``: a list of (op, args) over a growing list of tensors; t[0] is the input."""

    def __init__(self, spec: list[tuple], in_ch: int):
        super().__init__()
        self.spec = spec
        self.mods = nn.ModuleDict()
        ch = [in_ch]
        for i, (op, *a) in enumerate(spec):
            if op in ("conv", "gconv"):
                src, out, k, g = a
                self.mods[str(i)] = nn.Conv2d(ch[src], out, k, padding=k // 2, groups=g)
                ch.append(out)
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
        self.head = nn.Linear(ch[-1], 3)

    def forward(self, x):
        t = [x]
        for i, (op, *a) in enumerate(self.spec):
            if op in ("conv", "gconv"):
                t.append(self.mods[str(i)](t[a[0]]))
            elif op == "bn":
                t.append(torch.relu(self.mods[str(i)](t[a[0]])))
            elif op == "add":
                t.append(t[a[0]] + t[a[1]])
            elif op == "cat":
                t.append(torch.cat([t[a[0]], t[a[1]]], 1))
            elif op == "chunk":
                t.extend(t[a[0]].chunk(2, 1))
        return self.head(t[-1].mean((2, 3)))


@st.composite
def dags(draw):
    ch = [3]
    spec = []
    for _ in range(draw(st.integers(2, 7))):
        src = draw(st.integers(0, len(ch) - 1))
        op = draw(st.sampled_from(["conv", "gconv", "bn", "add", "cat", "chunk"]))
        same = [i for i, c in enumerate(ch) if c == ch[src] and i != src]
        if op == "add" and same:
            spec.append(("add", src, draw(st.sampled_from(same))))
            ch.append(ch[src])
        elif op == "cat" and src > 0:
            other = draw(st.integers(1, len(ch) - 1))
            spec.append(("cat", src, other))
            ch.append(ch[src] + ch[other])
        elif op == "chunk" and ch[src] % 2 == 0 and src > 0:
            spec.append(("chunk", src))
            ch += [ch[src] // 2] * 2
        elif op == "bn" and src > 0:
            spec.append(("bn", src))
            ch.append(ch[src])
        elif op == "gconv" and ch[src] % 2 == 0 and src > 0:
            g = 2
            out = g * draw(st.integers(1, 4))
            spec.append(("gconv", src, out, draw(st.sampled_from([1, 3])), g))
            ch.append(out)
        else:
            spec.append(("conv", src, draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([1, 3])), 1))
            ch.append(spec[-1][2])
    return spec


@given(spec=dags(), seed=st.integers(0, 3))
def test_random_dag_passes_the_oracle_or_is_refused(spec, seed):
    torch.manual_seed(seed)
    model = DAG(spec, 3).eval()
    x = (torch.randn(2, 3, 4, 4),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        pg = gp.capture(model, x)
    except gp.GraphPruneError:
        return
    same = gp.remove_channels(pg, {})
    np.testing.assert_allclose(same(*x).detach().numpy(), model(*x).detach().numpy(), atol=1e-6)
    for g in build_coupling(pg).groups:
        if g.prunable:
            run_oracle(pg, g.id, seed=seed).assert_close(atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class SeqDAG(nn.Module):
    """Token-sequence DAGs: linear, residual add, cat/chunk on features, and multi-head
    attention with a random number of heads (reshape to heads, SDPA, reshape back)."""

    def __init__(self, spec: list[tuple], dim: int):
        super().__init__()
        self.spec = spec
        self.mods = nn.ModuleDict()
        ch = [dim]
        for i, (op, *a) in enumerate(spec):
            if op == "linear":
                self.mods[str(i)] = nn.Linear(ch[a[0]], a[1])
                ch.append(a[1])
            elif op == "attn":
                src, heads = a
                self.mods[str(i)] = nn.ModuleList([nn.Linear(ch[src], ch[src]) for _ in range(4)])
                ch.append(ch[src])
            elif op == "add":
                ch.append(ch[a[0]])
            elif op == "cat":
                ch.append(ch[a[0]] + ch[a[1]])
            elif op == "chunk":
                ch += [ch[a[0]] // 2] * 2
        self.head = nn.Linear(ch[-1], 3)

    def forward(self, x):
        t = [x]
        for i, (op, *a) in enumerate(self.spec):
            if op == "linear":
                t.append(torch.relu(self.mods[str(i)](t[a[0]])))
            elif op == "attn":
                src, h = a
                q, k, v, o = self.mods[str(i)]
                b, n, c = t[src].shape
                split = lambda y: y.reshape(b, n, h, c // h).transpose(1, 2)  # noqa: E731
                y = nn.functional.scaled_dot_product_attention(split(q(t[src])), split(k(t[src])),
                                                               split(v(t[src])))  # fmt: skip
                t.append(t[src] + o(y.transpose(1, 2).reshape(b, n, c)))
            elif op == "add":
                t.append(t[a[0]] + t[a[1]])
            elif op == "cat":
                t.append(torch.cat([t[a[0]], t[a[1]]], -1))
            elif op == "chunk":
                t.extend(t[a[0]].chunk(2, -1))
        return self.head(t[-1]).mean(1)


@st.composite
def seq_dags(draw):
    ch, spec = [8], []
    for _ in range(draw(st.integers(2, 6))):
        src = draw(st.integers(0, len(ch) - 1))
        op = draw(st.sampled_from(["linear", "attn", "add", "cat", "chunk"]))
        same = [i for i, c in enumerate(ch) if c == ch[src] and i != src]
        heads = [h for h in (1, 2, 4) if ch[src] % h == 0 and ch[src] // h >= 2]
        if op == "add" and same:
            spec.append(("add", src, draw(st.sampled_from(same))))
            ch.append(ch[src])
        elif op == "cat" and src > 0:
            other = draw(st.integers(1, len(ch) - 1))
            spec.append(("cat", src, other))
            ch.append(ch[src] + ch[other])
        elif op == "chunk" and ch[src] % 2 == 0 and src > 0:
            spec.append(("chunk", src))
            ch += [ch[src] // 2] * 2
        elif op == "attn" and src > 0 and heads:
            spec.append(("attn", src, draw(st.sampled_from(heads))))
            ch.append(ch[src])
        else:
            spec.append(("linear", src, draw(st.sampled_from([4, 6, 8]))))
            ch.append(spec[-1][2])
    return spec


@given(spec=seq_dags(), seed=st.integers(0, 3))
def test_random_sequence_dag_passes_the_oracle(spec, seed):
    torch.manual_seed(seed)
    model = SeqDAG(spec, 8).eval()
    x = (torch.randn(2, 5, 8),)
    try:
        pg = gp.capture(model, x)
    except gp.GraphPruneError:
        return
    for g in build_coupling(pg).groups:
        if g.prunable:
            run_oracle(pg, g.id, seed=seed).assert_close(atol=1e-4, rtol=1e-4)
