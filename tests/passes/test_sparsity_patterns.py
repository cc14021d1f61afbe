"""Patterns: parsing, and every mask having exactly the requested pattern (property tests)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.ir.errors import ConfigError
from graphprune.api.sparsify import sparsify
from graphprune.passes.sparsity.patterns import (
    NM,
    Block,
    Unstructured,
    check_mask,
    parse_pattern,
    prune_count,
    select_global,
    select_mask,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.mark.parametrize(
    "text, want",
    [("unstructured", Unstructured()), ("2:4", NM(2, 4)), ("4:8", NM(4, 8)), (" 1 : 4 ", NM(1, 4)),
     ("block:1x4", Block(1, 4)), ("block:4x4", Block(4, 4)), ("BLOCK:16x1", Block(16, 1))],
)
def test_parse(text, want):
    assert parse_pattern(text) == want
    assert parse_pattern(str(want)) == want


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2:4:8", "block:0x4", "blk:4x4", "", "half",
                                  "block:4", 24])
def test_parse_rejects(text):
    with pytest.raises(ConfigError, match="pattern"):
        parse_pattern(text)


def _scores(draw, rows, cols, ties):
    vals = st.integers(0, 3) if ties else st.floats(-1e3, 1e3, allow_nan=False)
    flat = draw(st.lists(vals, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(flat, dtype=torch.float32).reshape(rows, cols)


@st.composite
def nm_case(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rows, groups = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    return NM(n, m), _scores(draw, rows, groups * m, draw(st.booleans()))


@given(nm_case())
@SETTINGS
def test_nm_keeps_exactly_n_per_group(case):
    pat, s = case
    keep = select_mask(s, pat, 0.0)
    groups = keep.reshape(s.shape[0], -1, pat.m).sum(-1)
    assert (groups == pat.n).all()  # exact counts by topk, whatever the ties
    assert check_mask(keep, pat)
    # kept entries score at least as high as pruned ones inside each group
    g = s.reshape(s.shape[0], -1, pat.m)
    k = keep.reshape(g.shape)
    lo_kept = torch.where(k, g, torch.full_like(g, math.inf)).amin(-1)
    hi_pruned = torch.where(~k, g, torch.full_like(g, -math.inf)).amax(-1)
    assert (lo_kept >= hi_pruned).all()


@st.composite
def block_case(draw):
    r, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    br, bc = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sp = draw(st.floats(0.0, 0.99))
    return Block(r, c), _scores(draw, r * br, c * bc, draw(st.booleans())), sp


@given(block_case())
@SETTINGS
def test_blocks_all_or_nothing_with_exact_count(case):
    pat, s, sp = case
    keep = select_mask(s, pat, sp)
    assert check_mask(keep, pat)
    nblocks = s.numel() // (pat.rows * pat.cols)
    kept_blocks = int(keep.sum()) // (pat.rows * pat.cols)
    assert kept_blocks == nblocks - prune_count(sp, nblocks)


@st.composite
def unstructured_case(draw):
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 12))
    return _scores(draw, rows, cols, draw(st.booleans())), draw(st.floats(0.0, 0.99))


@given(unstructured_case(), st.sampled_from(["layer", "row"]))
@SETTINGS
def test_unstructured_exact_count_per_group(case, group):
    s, sp = case
    keep = select_mask(s, Unstructured(), sp, group)
    if group == "layer":
        assert int((~keep).sum()) == prune_count(sp, s.numel())
    else:
        assert ((~keep).sum(1) == prune_count(sp, s.shape[1])).all()
    # nothing pruned scores above anything kept in the same group
    if (~keep).any() and keep.any():
        if group == "layer":
            assert s[~keep].max() <= s[keep].min()


@st.composite
def global_case(draw):
    layers = {f"l{i}": _scores(draw, draw(st.integers(1, 5)), draw(st.integers(1, 6)), False)
              for i in range(draw(st.integers(1, 4)))}
    return layers, draw(st.floats(0.0, 0.9)), draw(st.sampled_from([0.0, 0.05, 0.1]))


@given(global_case())
@SETTINGS
def test_global_exact_total_and_min_keep(case):
    layers, sp, min_keep = case
    total = sum(s.numel() for s in layers.values())
    try:
        keep = select_global(layers, Unstructured(), sp, min_keep)
    except ConfigError:
        reserved = sum(math.ceil(min_keep * s.numel()) for s in layers.values())
        assert reserved > total - prune_count(sp, total)
        return
    assert sum(int((~k).sum()) for k in keep.values()) == prune_count(sp, total)
    for name, k in keep.items():
        assert int(k.sum()) >= math.ceil(min_keep * k.numel())


@st.composite
def model_case(draw):
    pat = draw(st.sampled_from(["unstructured", "2:4", "4:8", "1:4", "block:1x4", "block:4x4",
                                "block:2x1"]))
    c_in = draw(st.sampled_from([4, 8, 16]))
    hidden = draw(st.sampled_from([8, 16]))
    return pat, c_in, hidden, draw(st.floats(0.1, 0.9)), draw(st.sampled_from(["layer", "global"]))


@given(model_case())
@SETTINGS
def test_sparsify_end_to_end_patterns(case):
    """Conv (reduction = C*kh*kw) and Linear layers all get the exact pattern."""
    pat, c_in, hidden, sp, scope = case
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(c_in, hidden, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(hidden * 16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    parsed = parse_pattern(pat)
    if isinstance(parsed, NM):
        sp, scope = None, "layer"
    res = sparsify(model, torch.randn(2, c_in, 4, 4), sparsity=sp, pattern=pat, scope=scope)
    assert "5" in res.report.excluded  # the head, by default
    for layer in ("0", "3"):  # pruned, or left dense because the pattern does not divide it
        assert (f"{layer}.weight" in res.masks) != ("not divisible" in
                                                     res.report.excluded.get(layer, ""))
    for name, mask in res.masks.items():
        w = dict(res.model.named_parameters())[name]
        m2 = mask.reshape(mask.shape[0], -1)
        assert check_mask(m2, parsed)
        assert (w[~mask] == 0).all()
        if isinstance(parsed, NM):
            assert (m2.reshape(m2.shape[0], -1, parsed.m).sum(-1) == parsed.n).all()
        elif isinstance(parsed, Unstructured) and scope == "layer":
            assert int((~mask).sum()) == prune_count(sp, mask.numel())
    if isinstance(parsed, Unstructured) and scope == "global":
        total = sum(m.numel() for m in res.masks.values())
        pruned = sum(int((~m).sum()) for m in res.masks.values())
        assert pruned == prune_count(sp, total)
    assert res.report.pattern_ok
