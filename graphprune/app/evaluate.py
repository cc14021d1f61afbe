"""Quality of a pruned model against its dense reference, on real data.

Three measurements, each for a PyTorch model *or* a compiled artifact (``graphprune.load`` /
``graphprune.codegen.compile``: any callable that takes numpy arrays and returns numpy arrays), so a
report can show the quality of what is actually deployed:

- :func:`perplexity`: causal-LM perplexity over one token stream with a fixed context length and
  stride (the result carries both; tables must state them, perplexity is meaningless without).
- :func:`embedding_similarity`: encoder sentence embeddings (masked mean pooling, L2-normalised)
  against a reference: mean cosine, and agreement of the similarity *rankings* of sentence pairs.
- :func:`classifier_agreement`: top-1 agreement and KL(reference || model) on a set of inputs, and
  accuracy where labels exist.

Pipeline position: after prune / sparsify / compile; reads models, never graphs. Static shapes:
pruned GraphModules and artifacts run only at the shapes they were captured with, so every helper
feeds fixed-size batches (``batch_size``) and pads the last one by repeating its final row; padded
rows are dropped before any statistic. Inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.frontends import kind_of
from graphprune.ir.errors import CaptureError, ConfigError

__all__ = [
    "ClassifierAgreement",
    "EmbeddingSimilarity",
    "Perplexity",
    "classifier_agreement",
    "embed",
    "embedding_similarity",
    "perplexity",
    "run_batched",
    "sliding_windows",
]

Output = int | str | Callable[[Any], Any] | None


# --------------------------------------------------------------------------------------------
# running a model or an artifact in fixed-size batches


def _select(out: Any, output: Output, default_names: Sequence[str]) -> Any:
    """Pick one tensor from whatever a forward returned (tensor, tuple, ModelOutput, dict)."""
    if callable(output):
        return output(out)
    if isinstance(output, str):
        return out[output] if isinstance(out, dict) else getattr(out, output)
    if isinstance(out, (torch.Tensor, np.ndarray)):
        return out
    if isinstance(output, int):
        return out[output]
    for name in default_names:  # a ModelOutput is a dict: prefer the name, not position 0
        if isinstance(out, dict) and name in out:
            return out[name]
        if not isinstance(out, dict) and hasattr(out, name):
            return getattr(out, name)
    if isinstance(out, (tuple, list)):
        return out[0]
    raise ConfigError(f"cannot pick an output from {type(out).__name__}: pass output=<index, "
                      f"attribute name or callable>")


def _is_torch(model: Any) -> bool:
    try:
        return kind_of(model) == "torch"
    except CaptureError:  # not a model a frontend captures: an artifact or a plain callable
        return False


def _call(model: Any, arrays: list[np.ndarray]) -> Any:
    if _is_torch(model):
        with torch.no_grad():
            return model(*[torch.from_numpy(a) for a in arrays])
    if callable(model):  # a compiled artifact: numpy in, numpy out
        return model(*arrays)
    raise ConfigError(f"model must be an nn.Module or a callable artifact, got "
                      f"{type(model).__name__}")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.cpu().numpy()
    return np.asarray(x)


def run_batched(model: Any, inputs: Sequence[Any], batch_size: int | None = None,
                output: Output = None, default_names: Sequence[str] = ("logits",)) -> np.ndarray:
    """Run ``model`` over ``inputs`` (arrays sharing their first dim) in fixed-size batches.

    Parameters
    ----------
    model : nn.Module or callable
        A torch model, or an artifact taking and returning numpy arrays.
    inputs : sequence of arrays or tensors
        Positional model inputs, each with ``N`` rows.
    batch_size : int, optional
        Rows per call (default: all ``N`` in one call). The last batch is padded to this size by
        repeating its final row, so static-shaped models see one shape only.
    output : int, str or callable, optional
        Which output to keep; default the first of ``default_names`` present, else position 0.

    Returns
    -------
    np.ndarray with ``N`` rows.

    Examples
    --------
    >>> lin = torch.nn.Linear(3, 2)
    >>> run_batched(lin, [np.zeros((5, 3), np.float32)], batch_size=2).shape
    (5, 2)
    """
    arrays = [_to_numpy(a) for a in inputs]
    if not arrays:
        raise ConfigError("inputs is empty: pass at least one input array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ConfigError(f"inputs disagree on the number of rows: {[len(a) for a in arrays]}")
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int")
    chunks = []
    for start in range(0, n, bs):
        part = [a[start : start + bs] for a in arrays]
        real = len(part[0])
        if real < bs:
            part = [np.concatenate([p, np.repeat(p[-1:], bs - real, axis=0)]) for p in part]
        out = _to_numpy(_select(_call(model, part), output, default_names))
        chunks.append(out[:real])
    return np.concatenate(chunks)


# --------------------------------------------------------------------------------------------
# perplexity


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of a causal LM over one token stream.

    ``ppl = exp(nll)``, ``nll`` the mean negative log-likelihood (nats) of the ``tokens`` predicted
    tokens; windows of ``context`` tokens advance by ``stride``, each token is predicted once,
    with up to ``context - 1`` tokens of left context.
    """

    ppl: float
    nll: float
    tokens: int
    context: int
    stride: int
    windows: int

    def __str__(self) -> str:
        return (f"ppl {self.ppl:.3f} ({self.tokens} tokens, context {self.context}, "
                f"stride {self.stride})")


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """Windows ``(begin, first_scored)`` of exactly ``context`` tokens covering ``n`` tokens.

    Each window spans ``[begin, begin + context)`` and scores the tokens at positions
    ``[first_scored, begin + context)`` (each predicted from the logits one position earlier);
    together they score positions ``1 .. n-1`` exactly once. The last window is aligned to the end
    of the stream so every window has the same length (static shapes).

    >>> sliding_windows(10, 4, 2)
    [(0, 1), (2, 4), (4, 6), (6, 8)]
    >>> sliding_windows(9, 4, 3)
    [(0, 1), (3, 4), (5, 7)]
    """
    if not (isinstance(context, int) and context >= 2):
        raise ConfigError(f"context={context!r} must be an int >= 2")
    if not (isinstance(stride, int) and 1 <= stride <= context - 1):
        raise ConfigError(f"stride={stride!r} must be an int in [1, context-1]: each window needs "
                          f"left context for the first token it scores")
    if n < context:
        raise ConfigError(f"the text has {n} tokens, fewer than context={context}")
    out, end = [(0, 1)], context
    while end < n:
        begin = min(end + stride - context, n - context)
        out.append((begin, end))
        end = begin + context
    return out


def perplexity(model: Any, tokens: Any, context: int = 512, stride: int | None = None,
               batch_size: int = 1, output: Output = None, attention_mask: bool = False,
               max_tokens: int | None = None) -> Perplexity:
    """Perplexity of a causal LM over ``tokens`` with a fixed context length and stride.

    Parameters
    ----------
    model : nn.Module or callable
        Maps ``input_ids (B, context)`` int64 (and ``attention_mask`` of ones if asked) to logits
        ``(B, context, V)``. A Hugging Face model, a pruned GraphModule or a compiled artifact.
    tokens : 1-D sequence of ints
        One token stream (e.g. a tokenised play).
    context : int
        Window length in tokens (every call has exactly this length).
    stride : int, optional
        How far windows advance; default ``context // 2`` (each scored token after the first
        window sees at least ``context - stride`` tokens of left context).
    batch_size : int
        Windows per call; the model must accept ``(batch_size, context)`` (static shapes).
    attention_mask : bool
        Also pass an all-ones ``attention_mask`` as the second input.
    max_tokens : int, optional
        Use only the first ``max_tokens`` tokens.

    Returns
    -------
    Perplexity(ppl, nll, tokens, context, stride, windows)

    Examples
    --------
    A model that predicts every token with equal probability has perplexity = vocabulary size:

    >>> class Uniform(torch.nn.Module):
    ...     def forward(self, ids):
    ...         return torch.zeros(*ids.shape, 50)
    >>> round(perplexity(Uniform(), list(range(40)), context=8, stride=4).ppl, 6)
    50.0
    """
    ids = (_to_numpy(tokens) if isinstance(tokens, torch.Tensor) else np.asarray(tokens))
    ids = ids.astype(np.int64).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    stride = context // 2 if stride is None else stride
    wins = sliding_windows(len(ids), context, stride)
    batch = np.stack([ids[b : b + context] for b, _ in wins])
    nll_sum, count = 0.0, 0
    for start in range(0, len(wins), batch_size):
        part = batch[start : start + batch_size]
        real = len(part)
        if real < batch_size:
            part = np.concatenate([part, np.repeat(part[-1:], batch_size - real, axis=0)])
        args = [part, np.ones_like(part)] if attention_mask else [part]
        logits = _select(_call(model, args), output, ("logits",))
        logits = torch.as_tensor(_to_numpy(logits))[:real].double()
        if logits.shape[:2] != (real, context):
            raise ConfigError(f"expected logits (batch, {context}, vocab), got "
                              f"{tuple(logits.shape)}: pass output= to select the logits")
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = torch.from_numpy(part[:real, 1:])
        lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (real, context-1)
        for row, (begin, first) in enumerate(wins[start : start + real]):
            scored = lp[row, first - begin - 1 :]
            nll_sum -= float(scored.sum())
            count += scored.numel()
    assert count == len(ids) - 1, (count, len(ids))
    nll = nll_sum / count
    return Perplexity(math.exp(nll), nll, count, context, stride, len(wins))


# --------------------------------------------------------------------------------------------
# encoder embeddings


@dataclass(frozen=True)
class EmbeddingSimilarity:
    """Pruned vs reference sentence embeddings.

    ``mean_cosine`` / ``min_cosine``: cosine of each sentence's two embeddings. ``spearman``:
    rank correlation of the two models' cosine similarities over ``pairs`` sentence pairs;
    ``pair_order``: fraction of pairs-of-pairs the two models order the same way (Kendall
    ``(tau + 1) / 2``); ``top1``: fraction of sentences whose nearest other sentence is the same.
    """

    mean_cosine: float
    min_cosine: float
    spearman: float
    pair_order: float
    top1: float
    sentences: int
    pairs: int


def embed(model: Any, input_ids: Any, attention_mask: Any, batch_size: int | None = None,
          output: Output = None) -> np.ndarray:
    """Sentence embeddings: mean of the last hidden state over the mask, L2-normalised.

    The pooling of sentence-transformers' all-MiniLM-L6-v2. ``model`` maps ``(input_ids,
    attention_mask)`` to hidden states ``(B, T, D)`` (``last_hidden_state`` of a ModelOutput).
    """
    mask = _to_numpy(attention_mask)
    h = run_batched(model, [input_ids, mask], batch_size, output, ("last_hidden_state",))
    if h.ndim != 3:
        raise ConfigError(f"expected hidden states (batch, tokens, dim), got {h.shape}: pass "
                          f"output= to select last_hidden_state")
    m = mask[..., None].astype(np.float64)
    e = (h.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman's definition)."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return np.bincount(inv, weights=r)[inv] / counts[inv]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def _pair_order(a: np.ndarray, b: np.ndarray) -> float:
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    return float((da[iu] == db[iu]).mean()) if len(iu[0]) else 1.0


def embedding_similarity(model: Any, reference: Any, input_ids: Any, attention_mask: Any,
                         pairs: Sequence[tuple[int, int]] | None = None,
                         batch_size: int | None = None, output: Output = None
                         ) -> EmbeddingSimilarity:
    """Compare a model's sentence embeddings with a reference model's.

    Parameters
    ----------
    model : nn.Module or callable
        The pruned (or compiled) encoder.
    reference : nn.Module, callable or array
        The dense encoder, or its embeddings ``(N, D)`` from :func:`embed` (computed once).
    input_ids, attention_mask : arrays ``(N, T)``
        Tokenised sentences (pad to one length for static-shaped models).
    pairs : sequence of (i, j), optional
        Sentence pairs whose similarity ranking is compared; default all ``i < j``.
    batch_size : int, optional
        Sentences per call (static-shaped models need the captured batch size).

    Examples
    --------
    >>> enc = torch.nn.Embedding(20, 4)
    >>> ids = torch.randint(0, 20, (6, 5)); mask = torch.ones(6, 5, dtype=torch.int64)
    >>> s = embedding_similarity(lambda i, m: enc(torch.as_tensor(i)).detach().numpy(), enc(ids)
    ...     .mean(1).detach().numpy(), ids, mask)
    >>> round(s.mean_cosine, 5), s.spearman, s.pairs
    (1.0, 1.0, 15)
    """
    e = embed(model, input_ids, attention_mask, batch_size, output)
    if isinstance(reference, (np.ndarray, torch.Tensor)):
        r = _to_numpy(reference).astype(np.float64)
        r = r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12)
    else:
        r = embed(reference, input_ids, attention_mask, batch_size, output)
    if r.shape != e.shape:
        raise ConfigError(f"reference embeddings {r.shape} do not match the model's {e.shape}")
    n = len(e)
    cos = (e * r).sum(-1)
    pairs = list(combinations(range(n), 2)) if pairs is None else list(pairs)
    if pairs:
        i, j = np.array(pairs).T
        se, sr = (e[i] * e[j]).sum(-1), (r[i] * r[j]).sum(-1)
        spearman, order = _spearman(se, sr), _pair_order(se, sr)
    else:
        spearman = order = float("nan")
    ge, gr = e @ e.T, r @ r.T
    np.fill_diagonal(ge, -np.inf)
    np.fill_diagonal(gr, -np.inf)
    top1 = float((ge.argmax(1) == gr.argmax(1)).mean()) if n > 1 else float("nan")
    return EmbeddingSimilarity(float(cos.mean()), float(cos.min()), spearman, order, top1, n,
                               len(pairs))


# --------------------------------------------------------------------------------------------
# classifiers


@dataclass(frozen=True)
class ClassifierAgreement:
    """Pruned vs reference classifier on the same inputs.

    ``top1``: fraction of inputs with the same argmax; ``kl``: mean KL(reference || model) in nats
    over the softmax of the logits; ``accuracy`` / ``reference_accuracy``: against labels
    (``None`` without labels).
    """

    top1: float
    kl: float
    accuracy: float | None
    reference_accuracy: float | None
    samples: int


def classifier_agreement(model: Any, reference: Any, inputs: Any, labels: Any = None,
                         batch_size: int | None = None, output: Output = None
                         ) -> ClassifierAgreement:
    """Top-1 agreement and KL divergence of a classifier to a reference, and accuracy.

    Parameters
    ----------
    model : nn.Module or callable
        The pruned (or compiled) classifier; returns logits ``(B, C)``.
    reference : nn.Module, callable or array
        The dense classifier, or its logits ``(N, C)`` computed once.
    inputs : array, or sequence of arrays
        ``N`` inputs (one array, or a list/tuple of positional input arrays).
    labels : array ``(N,)``, optional
        Class indices; gives ``accuracy``.

    Examples
    --------
    >>> net = torch.nn.Linear(4, 3)
    >>> x = torch.randn(10, 4)
    >>> r = classifier_agreement(net, net, x, labels=net(x).argmax(1))
    >>> r.top1, r.kl, r.accuracy
    (1.0, 0.0, 1.0)
    """
    args = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    logits = run_batched(model, args, batch_size, output)
    if isinstance(reference, (np.ndarray, torch.Tensor)):
        ref = _to_numpy(reference)
    else:
        ref = run_batched(reference, args, batch_size, output)
    if ref.shape != logits.shape or logits.ndim != 2:
        raise ConfigError(f"logits must be (N, classes) and match: model {logits.shape}, "
                          f"reference {ref.shape}")
    lp = F.log_softmax(torch.from_numpy(logits).double(), -1)
    lr = F.log_softmax(torch.from_numpy(ref).double(), -1)
    kl = float((lr.exp() * (lr - lp)).sum(-1).clamp_min(0).mean())
    top1 = float((logits.argmax(1) == ref.argmax(1)).mean())
    acc = ref_acc = None
    if labels is not None:
        y = _to_numpy(labels).reshape(-1)
        acc = float((logits.argmax(1) == y).mean())
        ref_acc = float((ref.argmax(1) == y).mean())
    return ClassifierAgreement(top1, kl, acc, ref_acc, len(logits))
