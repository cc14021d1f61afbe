"""Peak memory and time of ``gp.sparsify`` (Wanda, SparseGPT, 50%, ``inplace=True``) on an LLM.

The model is a ``LlamaForCausalLM`` of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 kv heads, vocab 32000) with random weights, built directly in the dtype
measured (fp32 or bf16, no fp32 intermediate); ``--shape 3b``: Llama-3.2-3B's shape instead
(hidden 3072, intermediate 8192, 28 layers, 24 heads, 8 kv heads, vocab 128256, head tied to
the embedding; fp32 12.0 GiB), in a table of its own. Calibration: 8 sequences of 256 random tokens, one
sequence per batch.

Each configuration runs in its own subprocess: imports, model build and calibration data first,
then the baseline (``VmRSS``), then the high-water mark is reset (``/proc/self/clear_refs`` 5) and
``gp.sparsify`` runs; the figure is ``VmHWM - baseline``: what sparsifying costs on top of the
model, compared with the model's own bytes (issue 17's goal: <= 1.25x, SparseGPT may add one
layer's Hessian and its inverse). Usage::

    .venv/bin/python benchmarks/bench_llm_memory.py [--shape 1b|3b] [--dtypes fp32,bf16]
        [--methods wanda:22,sparsegpt:2] [--before DIR] [--no-write]

Rows run in the order of ``--dtypes`` within ``--methods``, every "after" row before any
"before" row; the table is rewritten after each row. ``--methods`` lists ``method:layers``: the stack cut to that many layers (SparseGPT's solves
take minutes per layer on 2 cores, so its rows may use a cut stack; the embedding and head are
always there). ``--before DIR`` also runs every row with graphprune imported from ``DIR`` (an
older checkout: ``git archive <commit> | tar -x -C DIR``, then links
``DIR/graphprune/{passes,codegen,models} -> ../{passes,codegen,models}``), the code before a
change. Writes the
table between ``<!-- bench_llm_memory:start -->`` and ``end`` in ``BENCHMARKS.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from record import status_kib  # noqa: E402
START, END = "<!-- bench_llm_memory:start -->", "<!-- bench_llm_memory:end -->"
SHAPES = {
    # TinyLlama-1.1B
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
           "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
           "max_position_embeddings": 2048},
    # Llama-3.2-3B (tied embedding and head; fp32 12.0 GiB)
    "3b": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
           "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
           "head_dim": 128, "max_position_embeddings": 2048, "tie_word_embeddings": True},
}
SHAPE_NAMES = {"1b": "TinyLlama-1.1B", "3b": "Llama-3.2-3B"}
N_SEQ, SEQ_LEN = 8, 256
GIB = 2**30



def _child(args) -> None:
    """One configuration: print a JSON line with the figures."""
    if args.src:
        sys.path.insert(0, args.src)
    import ctypes
    import gc
    import time

    import torch
    import transformers

    import graphprune as gp

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = transformers.LlamaConfig(**{**SHAPES[args.shape], "num_hidden_layers": args.layers},
                                   use_cache=False)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy on the way
    model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (1, SEQ_LEN), generator=gen) for _ in range(N_SEQ)]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    res = gp.sparsify(model, sparsity=0.5, method=args.method, calib=calib, inplace=True)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM") * 1024
    assert res.model is model
    from graphprune.passes.sparsity import sparsify as pass_module

    # An older checkout needs graphprune/{passes,codegen,models} links to its own folders (the
    # editable install would map those subpackages to this tree): both must come from one tree.
    src = {str(Path(os.path.realpath(m.__file__)).parents[k])
           for m, k in ((gp, 1), (pass_module, 2))}
    print(json.dumps({"src": src.pop() if len(src) == 1 else f"mixed {sorted(src)}",
                      "dtype": args.dtype, "method": args.method, "layers": args.layers,
                      "model": model_bytes, "base": base, "peak": peak, "seconds": seconds,
                      "calibration": res.report.calibration,
                      "sparsity": res.report.total_sparsity}))


def _run(args, dtype: str, method: str, layers: int, src: str | None, label: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--dtype", dtype,
           "--method", method,
           "--layers", str(layers), "--threads", str(args.threads)]
    if src:
        cmd += ["--src", src]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{dtype}/{method} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if src and os.path.realpath(row["src"]) != os.path.realpath(src):
        raise RuntimeError(f"--before {src}: graphprune came from {row['src']}")
    return {**row, "code": label}


def _table(rows: list[dict]) -> str:
    lines = [("| code | dtype | method | layers | model GiB | baseline RSS GiB | peak above "
              "baseline GiB | x model | seconds | calibration |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["peak"] - r["base"]
        lines.append(f"| {r['code']} | {r['dtype']} | {r['method']} | {r['layers']} | "
                     f"{r['model'] / GIB:.2f} | "
                     f"{r['base'] / GIB:.2f} | {extra / GIB:.2f} | {extra / r['model']:.2f} | "
                     f"{r['seconds']:.1f} | {r['calibration']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="wanda", help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b",
                    help="1b (its table) or 3b (a table of its own, after the 1b one)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default="wanda:22,sparsegpt:2")
    ap.add_argument("--layers", type=int, default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--before", default=None, help="also run the code in this directory")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = SHAPES[args.shape]["num_hidden_layers"]
    if args.child:
        _child(args)
        return
    shape = SHAPES[args.shape]
    start, end_marker = START, END
    if args.shape != "1b":
        start, end_marker = (f"<!-- bench_llm_memory_{args.shape}:start -->",
                             f"<!-- bench_llm_memory_{args.shape}:end -->")
    load = os.getloadavg()
    label = "before"
    if args.before:
        commit = Path(args.before, "COMMIT")
        label = f"before ({commit.read_text().strip()[:7] if commit.exists() else args.before})"
    plan = []  # (dtype, method, layers, src, code); with --before, every "after" row comes first
    for src, code in [(None, "after")] + ([(args.before, label)] if args.before else []):
        for item in args.methods.split(","):
            method, _, layers = item.partition(":")
            for dtype in args.dtypes.split(","):
                plan.append((dtype, method, int(layers or shape["num_hidden_layers"]), src, code))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from record import cpu_name, write_block

    rows, skipped = [], []
    for dtype, method, layers, src, code in plan:
        need, free = _model_gib(args.shape, layers, dtype) + 4, _available_gib()
        if free < need:  # a shared machine: never push the others out of memory
            skipped.append(f"{dtype} {method} ({layers} layers) not run: {free:.1f} GiB "
                           f"available, it needs the model's bytes + 4 = {need:.1f} GiB")
            print(skipped[-1], flush=True)
        else:
            rows.append(_run(args, dtype, method, layers, src, code))
            print(_table(rows[-1:]), flush=True)
        if not rows:
            continue
        # Recorded after every row: a run cut short still leaves what it measured, and says so.
        done = "" if len(rows) + len(skipped) == len(plan) else (
            f" Incomplete run: {len(rows)} of the {len(plan)} rows planned were measured.")
        done += "".join(f" {s}." for s in skipped)
        rows.sort(key=lambda r: (r["method"], r["dtype"], r["code"] == "after"))
        end = os.getloadavg()
        head = (f"Machine: {cpu_name()}, {args.threads} threads; {datetime.date.today()}; load "
                f"average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after the "
                f"last row {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} (a shared machine: times are "
                f"noisy). Llama of {SHAPE_NAMES[args.shape]}'s shape "
                f"({shape['num_hidden_layers']} layers, or "
                f"cut to the layers listed), random weights; {N_SEQ} calibration sequences of "
                f"{SEQ_LEN} tokens; `gp.sparsify(model, sparsity=0.5, method=..., calib=..., "
                "inplace=True)`. Peak = VmHWM (reset after the model was built) minus the RSS "
                "then, in a fresh process per row. Produced by `benchmarks/bench_llm_memory.py`."
                + done)
        if not args.no_write:
            title = "LLM sparsify memory" + ("" if args.shape == "1b" else
                                             f", {SHAPE_NAMES[args.shape]} shape")
            write_block(start, end_marker, f"### {title} (issue 17)\n\n{head}\n\n"
                        f"{_table(rows)}", insert=_after_1b)
    if rows:
        print()
        print(head)
        print(_table(rows))


def _model_gib(shape: str, layers: int, dtype: str) -> float:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers})
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.LlamaForCausalLM(cfg).parameters())
    return n * (4 if dtype == "fp32" else 2) / GIB


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _after_1b(text: str, block: str) -> str:
    if END in text:
        i = text.index(END) + len(END)
        return text[:i] + "\n\n" + block + text[i:]
    return text.rstrip() + "\n\n" + block + "\n"


if __name__ == "__main__":
    main()
