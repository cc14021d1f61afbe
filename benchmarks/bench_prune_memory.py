"""Peak memory of ``gp.prune`` (structured, magnitude, ratio 0.25) on an LLM, in place and as a copy.

The model is a ``LlamaForCausalLM`` of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632,
32 heads, 4 kv heads, vocab 32000; ``--layers`` decoder layers, 22 in the real model) with random
weights, built directly in the dtype measured. Each row runs in its own subprocess: imports,
model and inputs first, one warm-up prune of a 1-layer model of the same width (lazy imports),
then the baseline (``VmRSS`` after ``malloc_trim``), the high-water mark is reset
(``/proc/self/clear_refs`` 5) and ``gp.prune`` runs. The figure is ``VmHWM - baseline`` over the
model's bytes. Issue 17's goal for in place: <= 1.25x; a copy keeps the user's model, so the
result (about 0.6x at this ratio) comes on top. Usage::

    .venv/bin/python benchmarks/bench_prune_memory.py [--layers 22] [--dtypes fp32,bf16]
        [--modes inplace,copy] [--no-write]

Writes the table between ``<!-- bench_prune_memory:start -->`` and ``end`` in ``BENCHMARKS.md``
unless ``--no-write``.
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
from record import cpu_name, status_kib, write_block  # noqa: E402

START, END = "<!-- bench_prune_memory:start -->", "<!-- bench_prune_memory:end -->"
SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
         "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}
GIB = 2**30



def _child(args) -> None:
    import ctypes
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import graphprune as gp

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 32))
    inplace = args.mode == "inplace"
    with torch.device("cpu"):
        warm = LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=1)).to(dtype).eval()
    gp.prune(warm, (ids,), ratio=0.25, inplace=inplace)
    del warm
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=args.layers)).eval()
    torch.set_default_dtype(torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    res = gp.prune(model, (ids,), ratio=0.25, inplace=inplace)
    seconds = time.perf_counter() - t0
    peak = (status_kib("VmHWM") - base) * 1024
    kept = sum(p.numel() * p.element_size() for p in res.model.parameters()) / nbytes
    print(json.dumps({"model_gib": nbytes / GIB, "base_gib": base * 1024 / GIB,
                      "peak_gib": peak / GIB, "x": peak / nbytes, "seconds": seconds,
                      "kept": kept, "form": res.report.form}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="inplace,copy")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    load0 = os.getloadavg()
    rows = []
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--mode", mode,
                   "--layers", str(args.layers)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{dtype}/{mode} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {dtype} | {mode} | {args.layers} | {r['model_gib']:.2f} | "
                        f"{r['base_gib']:.2f} | {r['peak_gib']:.2f} | {r['x']:.2f} | "
                        f"{r['kept']:.2f} | {r['form']} | {r['seconds']:.0f} |")  # fmt: skip
            print(rows[-1], flush=True)
    load1 = os.getloadavg()
    text = "\n".join([
        "### LLM structured prune memory (issue 17)", "",
        f"{cpu_name()}, {os.cpu_count()} cores; {datetime.date.today()}; load average {load0[0]:.2f} {load0[1]:.2f} "
        f"{load0[2]:.2f} before, {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} after (a shared "
        "machine: seconds are noisy, memory is not). Llama of TinyLlama-1.1B's width, random "
        "weights; `gp.prune(model, (ids,), ratio=0.25[, inplace=True])`, ids 1x32. Peak = VmHWM "
        "(reset after the model was built) minus the RSS then, in a fresh process per row; "
        "\"x model\" divides by the model's bytes, \"kept\" is the result's bytes over the "
        "model's. Produced by `benchmarks/bench_prune_memory.py`.", "",
        "| dtype | mode | layers | model GiB | baseline RSS GiB | peak above baseline GiB | "
        "x model | kept | form | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows])  # fmt: skip
    print(text)
    if not args.no_write:
        write_block(START, END, text)


if __name__ == "__main__":
    main()
