"""HF models as optimum's ONNX exporter writes them (``tests/data/optimum``, made by
``benchmarks/optimum_exports.py`` in a separate environment: optimum-onnx pins transformers<4.58).

optimum exports opset 18 with every input dim symbolic (``batch_size``, ``sequence_length``;
ViT's ``num_channels``, ``height``, ``width``). The batch stays symbolic through pruning; the
other dims are fixed with ``dynamic_shapes`` ranges of one size. BERT also prunes with its
``sequence_length`` symbolic: its position-embedding slice ``table[:sequence_length]`` folds to a
constant whose prefix grows with the length, captured as a Slice of the whole table with the
sliced axis frozen. The decoders' causal mask and flattened-batch mask index depend on the length
along two axes: replayed from the exporter's subgraph (``test_onnx_sequence.py``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphprune as gp
from graphprune.frontends.onnx.session import run_onnx
from graphprune.testing.oracle_onnx import run_oracle_onnx

DATA = Path(__file__).resolve().parents[1] / "data" / "optimum"
SEQ = 16

# Prunable groups by size, derived from the configs (hidden 32, 2 layers, 4 heads of 8;
# intermediate 64, GPT-2's 4 x 32 = 128; LLaMA 2 KV heads):
GROUPS = {
    # per layer: heads, q/k head_dim, v head_dim, MLP (2 x 4); hidden frozen (it is the output)
    "bert": {4: 2, 8: 4, 64: 2},
    # per layer: heads, q/k head_dim, v head_dim (c_attn's output is split into q, k, v before
    # the heads reshape), MLP (2 x 4); hidden (1, the tied wte/lm_head with it)
    "gpt2": {32: 1, 4: 2, 8: 4, 128: 2},
    # per layer: KV-head groups (a KV head with its 2 query heads), v head_dim, MLP (2 x 3);
    # the q/k rotary frequencies, one index across both layers (one inv_freq table) (1);
    # hidden (1) -- as the torch capture of llama_tiny
    "llama": {2: 2, 8: 2, 64: 2, 4: 1, 32: 1},
    # per layer: heads, q/k head_dim, v head_dim, MLP (2 x 4); hidden frozen (the output)
    "vit": {4: 2, 8: 4, 64: 2},
}


def feeds(name: str, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    f = {"input_ids": rng.integers(0, 64, (batch, SEQ)).astype(np.int64),
         "attention_mask": np.ones((batch, SEQ), np.int64)}  # fmt: skip
    if name == "bert":
        f["token_type_ids"] = np.zeros((batch, SEQ), np.int64)
    else:
        f["position_ids"] = np.tile(np.arange(SEQ, dtype=np.int64), (batch, 1))
    return f


def fixed(name: str) -> dict[str, tuple[int, int]]:
    if name == "vit":
        return {"num_channels": (3, 3), "height": (32, 32), "width": (32, 32)}
    return {"sequence_length": (SEQ, SEQ)}


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_optimum_export_prunes_with_its_batch_symbolic(name):
    path = str(DATA / f"{name}.onnx")
    assert onnx.load(path).opset_import[0].version == 18
    pg = gp.capture(path, feeds(name), dynamic_shapes=fixed(name))
    groups = [g for g in gp.groups(pg) if g.prunable]
    assert Counter(g.size for g in groups) == Counter(GROUPS[name]), gp.explain(pg)
    res = gp.prune(path, feeds(name), ratio=0.3, dynamic_shapes=fixed(name))
    assert res.report.params_after < res.report.params_before
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"
    for batch in (1, 3):
        out = run_onnx(res.model, feeds(name, batch))
        assert out[0].shape[0] == batch and np.isfinite(out[0]).all()
    # oracle: the smallest and the largest group (the hidden stream where it is prunable)
    for g in (min(groups, key=lambda g: g.size), max(groups, key=lambda g: g.size)):
        run_oracle_onnx(pg, g.id, feeds=feeds(name)).assert_close(atol=5e-5, rtol=1e-4)


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_optimum_export_oracle_on_every_group(name):
    path = str(DATA / f"{name}.onnx")
    pg = gp.capture(path, feeds(name), dynamic_shapes=fixed(name))
    for g in [g for g in gp.groups(pg) if g.prunable]:
        run_oracle_onnx(pg, g.id, feeds=feeds(name)).assert_close(atol=5e-5, rtol=1e-4)


def test_bert_prunes_with_sequence_length_symbolic():
    path = str(DATA / "bert.onnx")
    pg = gp.capture(path, feeds("bert"))  # default range (1, 64) for both dims
    groups = [g for g in gp.groups(pg) if g.prunable]
    assert Counter(g.size for g in groups) == Counter(GROUPS["bert"]), gp.explain(pg)
    tables = [o for o in pg.ops() if pg.op(o).attrs.get("symbolic_bounds")]
    assert tables  # the position table's slice: its positions never a group
    same = gp.prune(path, feeds("bert"), ratio=0.0)  # the symbolic rebuild alone
    longer = {k: np.tile(v, (1, 3))[:, :40] for k, v in feeds("bert", 3).items()}
    np.testing.assert_allclose(run_onnx(same.model, longer)[0], run_onnx(path, longer)[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    res = gp.prune(path, feeds("bert"), ratio=0.3)
    dims = res.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch_size", "sequence_length"]
    assert run_onnx(res.model, longer)[0].shape[:2] == (3, 40)
    run_oracle_onnx(pg, groups[0].id, feeds=feeds("bert")).assert_close(atol=5e-5, rtol=1e-4)

