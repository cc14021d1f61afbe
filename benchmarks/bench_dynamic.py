"""Latency of a dynamic-shape artifact vs static artifacts compiled for each exact shape.

Issue 14's goal: at every shape of the sweep, ``gp.compile(..., dynamic_shapes=...)`` (one
artifact, symbolic batch and sequence) within 10% of ``gp.compile`` for that exact shape.

* **BERT-base** shape (``transformers.BertModel``, default config, random weights; inputs
  ``input_ids`` and ``attention_mask``): dynamic ``batch`` in [1, 16] and ``seq`` in
  [2, 512]; sweep batch 1, 4, 16 x sequence 16, 128, 384.
* **CNN**: ResNet-50 (224x224) with a dynamic batch in [1, 16]; sweep batch 1, 4, 16
  (``--cnns resnet18,resnet50`` adds ResNet-18 widths at 64x64, what ``--quick`` runs).

One process; the static and dynamic artifacts of a shape are timed in alternating rounds
(``--rounds``), each round the mean of back-to-back calls over at least ``--min-ms`` (TVM's
``time_evaluator`` on the shipped library and weights), and the best round is reported, so
load from other processes hits both alike. ``ratio`` = dynamic / static (1.10 is the goal's
limit). ``TVM_NUM_THREADS`` is read from the environment (default: all cores).

    python benchmarks/bench_dynamic.py            # the full sweep (long: a static build per shape)
    python benchmarks/bench_dynamic.py --quick    # BERT-base at 3 shapes, a small ResNet at 3
    python benchmarks/bench_dynamic.py --cnns resnet18,resnet50 --rounds 3  # full, both CNNs

The table goes into BENCHMARKS.md between the ``bench_dynamic`` markers with the CPU, date and
load average (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from record import cpu_name, md_table, write_block

from graphprune import codegen

START, END = "<!-- bench_dynamic:start -->", "<!-- bench_dynamic:end -->"


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="few shapes, a small CNN")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-ms", type=float, default=200.0, help="per timing round")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--workdir", default=None, help="keep the artifacts here")
    p.add_argument("--cnns", default=None,
                   help="comma-separated CNNs of resnet18 (64x64), resnet50 (224x224); default "
                        "resnet18 with --quick, else resnet50")  # fmt: skip
    return p.parse_args()


def bert_case(quick: bool):
    from graphprune.models.hf import hf_bert_base

    model, _ = hf_bert_base()
    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("seq", min=2, max=512)
    dyn = {"inputs": ({0: batch, 1: seq}, {0: batch, 1: seq})}
    shapes = [(1, 16), (1, 128), (4, 128)] if quick else [
        (b, s) for b in (1, 4, 16) for s in (16, 128, 384)
    ]  # fmt: skip

    def inputs(shape):
        b, s = shape
        g = torch.Generator().manual_seed(b * 1000 + s)
        return torch.randint(0, 30522, (b, s), generator=g), torch.ones(b, s, dtype=torch.int64)

    return "BERT-base", model, dyn, shapes, inputs, lambda sh: f"batch {sh[0]}, seq {sh[1]}"


def cnn_case(name: str):
    from graphprune.models.resnet import BasicBlock, ResNet, resnet50

    if name not in ("resnet18", "resnet50"):
        raise SystemExit(f"--cnns: unknown CNN {name!r} (resnet18, resnet50)")
    if name == "resnet18":  # ResNet-18 widths at 64x64: the same kernels' shapes, minutes less
        torch.manual_seed(0)
        model = ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], 1000).eval()
        hw, name = 64, "ResNet-18 (64x64)"
    else:
        model, _ = resnet50()
        hw, name = 224, "ResNet-50 (224x224)"
    dyn = ({0: torch.export.Dim("batch", min=1, max=16)},)

    def inputs(shape):
        return (torch.randn(shape[0], 3, hw, hw, generator=torch.Generator().manual_seed(0)),)

    return name, model, dyn, [(1,), (4,), (16,)], inputs, lambda sh: f"batch {sh[0]}"


def _vm_call(art_path: Path, xs):
    """A ``time_evaluator`` over ``main`` of the shipped library and weights, fresh VM."""
    import json

    import tvm
    from tvm import relax

    man = json.loads((art_path / "manifest.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art_path / man["library"])), tvm.cpu())
    with np.load(art_path / man["weights"]) as w:
        params = [tvm.runtime.tensor(w[k]) for k in man["weight_names"]]
    args = [tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in xs] + params
    return vm, args


def _round_ms(vm, args, min_ms: float) -> float:
    import tvm

    ev = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=int(min_ms))
    return 1e3 * float(ev(*args).mean)


def run_case(case, work: Path, rounds: int, min_ms: float) -> list[list]:
    name, model, dyn, shapes, make_inputs, label = case
    # torch.export specialises an axis whose example size is 0 or 1: export at 2.
    example = make_inputs((2, *shapes[0][1:]) if len(shapes[0]) == 1 else (2, 32))
    t0 = time.perf_counter()
    dyn_art = codegen.compile(model, example, out_dir=work / f"{name}-dynamic", dynamic_shapes=dyn)
    dyn_build = time.perf_counter() - t0
    print(f"{name}: dynamic artifact built in {dyn_build:.0f} s", flush=True)
    rows = []
    for shape in shapes:
        xs = make_inputs(shape)
        t0 = time.perf_counter()
        static = codegen.compile(model, xs, out_dir=work / f"{name}-{'x'.join(map(str, shape))}")
        build_s = time.perf_counter() - t0
        with torch.no_grad():
            ref = model(*xs)
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        ref = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref
        errs = []
        for art in (static, dyn_art):
            out = art(*xs)
            out = out[0] if isinstance(out, tuple) else out
            errs.append(float(np.abs(out - ref.numpy()).max()))
        s_vm, s_args = _vm_call(static.path, xs)
        d_vm, d_args = _vm_call(dyn_art.path, xs)
        s_ms, d_ms = [], []
        for _ in range(rounds):  # alternate, so background load hits both
            s_ms.append(_round_ms(s_vm, s_args, min_ms))
            d_ms.append(_round_ms(d_vm, d_args, min_ms))
        s, d = min(s_ms), min(d_ms)
        print(f"  {label(shape)}: static {s:.2f} ms, dynamic {d:.2f} ms, ratio {d / s:.3f} "
              f"(static build {build_s:.0f} s; max err {errs[0]:.1e} / {errs[1]:.1e})",
              flush=True)  # fmt: skip
        rows.append([name, label(shape), f"{s:.2f}", f"{d:.2f}", f"{d / s:.2f}",
                     f"{errs[0]:.0e} / {errs[1]:.0e}"])  # fmt: skip
    return rows


def _body(args, threads: str, load0: str, rows: list, pending: list[str]) -> str:
    from graphprune.codegen.target import detect_mcpu

    load1 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    head = ["model", "shape", "static ms", "dynamic ms", "dynamic / static", "max err s / d"]
    flags = (" --quick" if args.quick else "") + (f" --cnns {args.cnns}" if args.cnns else "")
    left = f" **Partial: still running {', '.join(pending)}.**" if pending else ""
    return (
        f"## Dynamic vs static artifacts (bench_dynamic{flags})\n\n"
        f"{cpu_name()}, {os.cpu_count()} cores, mcpu={detect_mcpu()}, TVM_NUM_THREADS "
        f"{threads}; {dt.date.today().isoformat()}; load average (1/5/15 min) {load0} at "
        f"start, {load1} at end (the machine was shared with other jobs: figures are noisy). "
        f"Best of {args.rounds} alternating rounds of >= {args.min_ms:.0f} ms each. The dynamic "
        f"artifact is one build per model (symbolic dims, bounds from `torch.export.Dim`); each "
        f"static one is compiled for that exact shape. Goal: dynamic / static <= 1.10.{left}\n\n"
        f"{md_table(head, rows)}\n"
    )


def main():
    args = _args()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    threads = os.environ.get("TVM_NUM_THREADS", f"all ({os.cpu_count()})")
    cnns = [c.strip() for c in (args.cnns or ("resnet18" if args.quick else "resnet50")).split(",")]
    cases = [lambda: bert_case(args.quick)] + [lambda c=c: cnn_case(c) for c in cnns]
    names = ["BERT-base", *cnns]
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="bench_dynamic-") as tmp:
        work = Path(args.workdir or tmp)
        for i, make in enumerate(cases):
            rows += run_case(make(), work, args.rounds, args.min_ms)
            body = _body(args, threads, load0, rows, names[i + 1 :])
            if not args.no_write:  # after each model: a long run cut short keeps its rows
                write_block(START, END, body)
    print(body)


if __name__ == "__main__":
    main()
