"""Quality of INT8 quantization (``gp.quantize``) on real weights, alone and after prune + sparsify.

- all-MiniLM-L6-v2: mean / min cosine of sentence embeddings vs the dense float model on the
  [eval] sentences of tests/data/sentences.txt, calibration on its [calib] sentences (goal: W8A8
  loses <= 0.01 mean cosine). Combined row: ``gp.prune`` 20% channels (L2) -> ``gp.sparsify`` 50%
  Wanda -> W8A8, against the same dense model.
- SmolLM2-135M: perplexity on Hamlet with bench_quality.py's protocol (context 256, stride 128,
  batch 2), calibration on Macbeth, Othello and King Lear (disjoint from the evaluation text);
  ratio to dense (goal: W8A8 <= 1.05). Combined row: 50% Wanda sparsity -> W8A8.

Layers quantized: every Linear but the output head (MiniLM's pooler, SmolLM2's lm_head), which
``gp.quantize`` leaves in float by default. Time = the step's call (quantize: observers, scales,
error report, write-back; or the prune/sparsify step of a float row), not the evaluation. One run, the tables printed and written between
``<!-- bench_quantize:start/end -->`` in BENCHMARKS.md (one block per model, each with the
machine and load average of its run).

    .venv/bin/python benchmarks/bench_quantize.py [--quick] [--no-write] [--only minilm,llm]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
from bench_quality import load_minilm, load_smollm2, play_tokens
from record import cpu_name, write_block
from record import md_table as table

import graphprune as gp
from graphprune.app import evaluate as ev

START, END = "<!-- bench_quantize:start -->", "<!-- bench_quantize:end -->"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _max_err(res) -> str:
    e = getattr(res.report, "max_rel_error", None)  # a sparsify step has none
    return "-" if e is None else f"{e:.3f}"


def bench_minilm(quick: bool) -> str:
    tok, model, sec, calib, ids, mask, dense = load_minilm()
    graph = gp.capture(model, calib[0])
    rows = []

    def row(name, fn):
        res, sec_ = _timed(fn)
        if res is None:
            return None
        s = ev.embedding_similarity(res.model, dense, ids, mask)
        rows.append([name, f"{s.mean_cosine:.4f}", f"{1 - s.mean_cosine:.4f}",
                     f"{s.min_cosine:.4f}", f"{s.spearman:.4f}", _max_err(res), f"{sec_:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
        return res

    row("W8 (weights only)", lambda: gp.quantize(model, scheme="w8", calib=calib, graph=graph))
    for scheme in ("w8a8_dynamic", "w8a8_static"):
        res = row(f"W8A8 {scheme[5:]}", lambda s=scheme: gp.quantize(
            model, scheme=s, calib=calib, graph=graph))
    row("W8A8 static, percentile 99.99", lambda: gp.quantize(
        model, scheme="w8a8_static", calib=calib, percentile=99.99, graph=graph))
    row("W8A8 static, mse observer", lambda: gp.quantize(
        model, scheme="w8a8_static", calib=calib, observer="mse", graph=graph))
    res = gp.quantize(model, scheme="w8a8_dynamic", calib=calib, smooth=0.5, graph=graph)
    smooth_note = (f"{len(res.report.smoothed)} norms smoothed; e.g. "
                   + "; ".join(f"{k}: {v}" for k, v in list(res.report.not_smoothed.items())[:1]))
    if not quick:
        sp = {}

        def pruned_sparse():
            pr = gp.prune(model, calib[0], ratio=0.2, criterion="l2")
            sp["res"] = gp.sparsify(pr.model, calib[0], sparsity=0.5, method="wanda", calib=calib)
            return sp["res"]

        row("prune 20% (L2) + 50% Wanda, float", pruned_sparse)
        row("prune 20% (L2) + 50% Wanda + W8A8 dynamic",
            lambda: gp.quantize(sp["res"], scheme="w8a8_dynamic", calib=calib))
    head = ["model", "mean cosine", "loss (1 - mean)", "min cosine",
            f"Spearman ({len(ids) * (len(ids) - 1) // 2} pairs)",
            "max layer rel. error (calib)", "step s"]  # fmt: skip
    return (f"**all-MiniLM-L6-v2** vs dense float: {len(ids)} [eval] sentences of "
            f"tests/data/sentences.txt, calibration on its {len(sec['calib'])} [calib] sentences "
            "(batches of 8, padding tokens left out of the observers). SmoothQuant does not "
            f"apply to BERT's post-LN blocks ({smooth_note}).\n\n" + table(head, rows))


def bench_llm(quick: bool, progress=None) -> str:
    """The SmolLM2 table; ``progress(text)`` gets the table so far after every row (so a run cut
    short still records the rows it measured, in the priority order below)."""
    ctx, stride = 256, 128
    n_eval, n_calib = (512, 4) if quick else (2048, 16)
    tok, model = load_smollm2()
    eval_ids = play_tokens(tok, "hamlet_gut.txt", 40000)[:n_eval]
    cal = torch.cat([play_tokens(tok, p, 20000) for p in
                     ("macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")])  # fmt: skip
    cal = cal[: n_calib * ctx].reshape(n_calib // 2, 2, ctx)
    calib = [(b,) for b in cal]
    head = ["model", "smoothed", f"ppl (ctx {ctx}, stride {stride})", "ratio to dense",
            "max layer rel. error (calib)", "step s"]  # fmt: skip
    order = ["W8A8 dynamic", "W8A8 static + SmoothQuant 0.5", "50% Wanda, float",
             "50% Wanda + W8A8 dynamic", "W8A8 static", "W8A8 dynamic + SmoothQuant 0.5",
             "W8 (weights only)"]  # fmt: skip

    def text() -> str:
        missing = [r for r in order if r not in {row[0] for row in rows}]
        cut = f" Not run (cut short): {', '.join(missing)}." if missing else ""
        return (f"**SmolLM2-135M** (Q4_1 GGUF dequantised to fp32): perplexity on the first "
                f"{len(eval_ids)} tokens of Hamlet (from 10% into the file), context {ctx}, "
                f"stride {stride}, batch 2; calibration {n_calib} x {ctx} tokens of Macbeth, "
                f"Othello, Lear (no overlap with the evaluation text).{cut}\n\n"
                + table(head, rows))  # fmt: skip

    def ppl(m) -> float:
        return ev.perplexity(m, eval_ids, context=ctx, stride=stride, batch_size=2).ppl

    dense = ppl(model)
    rows = [["dense float", "-", f"{dense:.2f}", "1.000", "-", "-"]]
    print(" | ".join(rows[-1]), flush=True)
    graph = gp.capture(model, calib[0])

    def row(name, fn):
        res, sec = _timed(fn)
        p = ppl(res.model)
        smoothed = getattr(res.report, "smoothed", None)
        sm = f"{len(smoothed)} norms" if smoothed else "-"
        rows.append([name, sm, f"{p:.2f}", f"{p / dense:.3f}", _max_err(res), f"{sec:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
        if progress is not None:
            progress(text())

    sp = {}

    def sparse():
        sp["res"] = gp.sparsify(model, calib[0], sparsity=0.5, method="wanda", calib=calib)
        return sp["res"]

    q = gp.quantize
    runs = {
        "W8A8 dynamic": lambda: q(model, scheme="w8a8_dynamic", calib=calib, graph=graph),
        "W8A8 static + SmoothQuant 0.5": lambda: q(model, scheme="w8a8_static", calib=calib,
                                                   smooth=0.5, graph=graph),
        "50% Wanda, float": sparse,
        "50% Wanda + W8A8 dynamic": lambda: q(sp["res"], scheme="w8a8_dynamic", calib=calib),
        "W8A8 static": lambda: q(model, scheme="w8a8_static", calib=calib, graph=graph),
        "W8A8 dynamic + SmoothQuant 0.5": lambda: q(model, scheme="w8a8_dynamic", calib=calib,
                                                    smooth=0.5, graph=graph),
        "W8 (weights only)": lambda: q(model, scheme="w8", calib=calib, graph=graph),
    }  # fmt: skip
    for name in order:
        row(name, runs[name])
    return text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="SmolLM2: 512 evaluation and 4 x 256 calibration tokens (bench_quality's "
                         "--quick); MiniLM: no combined rows")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--only", default="minilm,llm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def header() -> str:
        load = os.getloadavg()
        return (f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
                f"({args.threads} threads); {datetime.date.today()}; load average "
                f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine: the times are "
                f"noisy, the quality numbers are not){'; --quick' if args.quick else ''}.\n\n")

    def record(name: str, body: str) -> None:
        if not args.no_write:
            write(name, header() + body)

    if "minilm" in args.only:
        body = bench_minilm(args.quick)
        print(body, flush=True)
        record("minilm", body)
    if "llm" in args.only:
        body = bench_llm(args.quick, progress=lambda t: record("llm", t))
        print(body, flush=True)
        record("llm", body)


def write(name: str, text: str) -> None:
    """Replace part ``name``'s block inside the bench_quantize block of BENCHMARKS.md (the other
    part keeps its last recorded run)."""

    def insert(doc: str, block: str) -> str:
        if START not in doc or END not in doc:
            doc = doc.rstrip() + f"\n\n## INT8 quantization quality (bench_quantize.py)\n\n{START}\n{END}\n"
        return doc.replace(END, block + "\n\n" + END)

    write_block(f"<!-- bench_quantize:{name}:start -->", f"<!-- bench_quantize:{name}:end -->",
                text, insert=insert)


if __name__ == "__main__":
    main()
