"""Structured pruning: MACs ratio vs measured PyTorch CPU latency ratio, ours and Torch-Pruning.

For a ResNet-50-size CNN and a BERT-base-size encoder (random weights: latency does not depend on
their values), at ratios 0.3/0.5/0.7, with and without ``round_to=8``: prune with ``gp.prune``
(l2, local), time dense and pruned in the same process (threads pinned, median of several runs),
and the same with Torch-Pruning's MagnitudePruner where it is installed. The goal: at ratio 0.5
the measured speed-up is at least 0.8x the MAC reduction. Records its table in BENCHMARKS.md.

``--peers`` adds the speed-up of the same dense and pruned models exported to ONNX and run by
ONNX Runtime and OpenVINO (``peers.py``; dense and pruned timed in interleaved turns): whether
the runtimes users deploy with turn the MAC reduction into latency at the pruned (odd) widths.

    .venv/bin/python benchmarks/bench_structured.py [--threads 2] [--runs 10] [--quick] [--peers]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(__file__))
from record import cpu_name, write_section  # noqa: E402

warnings.filterwarnings("ignore")


def latency(model, inputs, runs: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(*inputs)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def tp_prune(model, inputs, ratio, round_to):
    import torch_pruning as tp

    m = copy.deepcopy(model)
    ex = inputs[0] if len(inputs) == 1 else inputs
    ignored = [mod for name, mod in m.named_modules()
               if name.endswith(("fc", "pooler.dense", "classifier"))]  # fmt: skip
    pruner = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=ignored,
                                       round_to=round_to)  # fmt: skip
    pruner.step()
    macs, params = tp.utils.count_ops_and_params(m, ex)
    return m, macs


def peer_speedups(dense, pruned, inputs, threads: int, runs: int, mac_x: float) -> list[str]:
    """ONNX Runtime's and OpenVINO's dense ms / pruned ms on the ONNX exports of both models,
    each followed by that speed-up over the MAC reduction ``mac_x``."""
    import tempfile

    import peers

    arrays = peers.as_arrays(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        calls = {}
        for tag, m in (("dense", dense), ("pruned", pruned)):
            path = peers.export_onnx(m, inputs, os.path.join(tmp, f"{tag}.onnx"))
            for name, fn in peers.peer_runners(path, arrays, threads).items():
                calls[name, tag] = fn
        ms = peers.time_turns(calls, runs)
    out = []
    for name in peers.PEERS:
        speedup = ms[name, "dense"].median / ms[name, "pruned"].median
        out += [f"{speedup:.2f}", f"{speedup / mac_x:.2f}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small models, for a smoke run")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--peers", action="store_true", help="ONNX Runtime / OpenVINO speed-ups")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import graphprune as gp
    from graphprune import models

    try:
        import torch_pruning  # noqa: F401

        have_tp = True
    except ImportError:
        have_tp = False
    names = ["resnet_tiny", "hf_bert_tiny"] if args.quick else ["resnet50", "hf_bert_base"]
    rows = []
    for name in names:
        model, inputs = models.get(name)
        pg = gp.capture(model, inputs)
        dense_ms = latency(model, inputs, args.runs)
        for ratio in (0.3, 0.5, 0.7):
            for round_to in (None, 8):
                res = gp.prune(model, inputs, ratio=ratio, criterion="l2", round_to=round_to,
                               graph=pg, ignore=None)  # fmt: skip
                ms = latency(res.model, inputs, args.runs)
                mac_x = 1 / res.report.macs_ratio
                lat_x = dense_ms / ms
                row = [name, f"{ratio}", str(round_to or "-"), res.report.form,
                       f"{res.report.macs_ratio:.3f}", f"{dense_ms:.1f}", f"{ms:.1f}",
                       f"{lat_x:.2f}", f"{lat_x / mac_x:.2f}"]  # fmt: skip
                if have_tp:
                    try:
                        tpm, tp_macs = tp_prune(model, inputs, ratio, round_to or 1)
                        import torch_pruning as tp

                        base_macs, _ = tp.utils.count_ops_and_params(model, inputs[0] if len(inputs) == 1 else inputs)
                        tms = latency(tpm, inputs, args.runs)
                        row += [f"{tp_macs / base_macs:.3f}", f"{tms:.1f}", f"{dense_ms / tms:.2f}"]
                    except Exception as e:  # noqa: BLE001 - a peer failing is a result
                        row += ["failed", type(e).__name__, "-"]
                else:
                    row += ["-", "-", "-"]
                if args.peers:
                    row += peer_speedups(model, res.model, inputs, args.threads, args.runs, mac_x)
                rows.append(row)
                print(" | ".join(row), flush=True)
    head = ["model", "ratio", "round_to", "our form", "our MACs ratio", "dense ms", "our ms",
            "our speed-up", "speed-up / MAC reduction", "TP MACs ratio", "TP ms", "TP speed-up"]
    if args.peers:
        head += ["ORT speed-up", "ORT speed-up / MAC reduction", "OpenVINO speed-up",
                 "OpenVINO speed-up / MAC reduction"]  # fmt: skip
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                      + ["| " + " | ".join(r) + " |" for r in rows])  # fmt: skip
    load = os.getloadavg()[0]
    text = (f"Run {date.today()} on {cpu_name()} ({os.cpu_count()} cores), torch "
            f"{torch.__version__}, {args.threads} threads, median of {args.runs} runs, load "
            f"average {load:.1f} at the end; batch 2 (ResNet-50 224x224, BERT seq 128). Ours: "
            "gp.prune(criterion='l2', scope='local'); TP: Torch-Pruning MagnitudePruner (L2), "
            "classifier/pooler ignored.\n\n" + table)
    print(text)
    if not args.no_write and not args.quick:
        write_section("Structured pruning latency (bench_structured.py)", text)


if __name__ == "__main__":
    main()
