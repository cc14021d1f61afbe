"""A/B of the K-blocked GEMM schedule on single matmuls, against ONNX Runtime (issue 16).

For each shape ``MxKxN`` (``X[M, K] @ W[K, N]``, the weight packed as the rule packs it), builds
one Linear through the full pipeline (:func:`graphprune.codegen.sparse_rewrite.compile_probe`)
per variant, in one process: ``rule`` (the rules as they are), ``no-mblock`` (row blocks forced
to 1: the schedule before ``codegen/cpu_blocking.py``) and any ``--tile RT,CT`` (register tile
forced: rows x column vectors). ORT runs the same product as an ONNX ``MatMul`` with
``intra_op_num_threads`` = ``--threads``. All are timed in interleaved turns (each turn: one
untimed call, then back-to-back calls for 50 ms), best of ``--turns``. ``--cpu-time`` times in
process CPU time instead of wall time: on shared, loaded cores that leaves out the time the
process waited for a core (1 thread only: at 2 threads it counts spinning workers too).
Prints a table (ms, GMAC/s, ORT ÷ variant); no figure is kept.

    python benchmarks/ab_gemm_blocks.py                       # BERT-base FFN GEMMs, seq 128
    python benchmarks/ab_gemm_blocks.py 128x768x144 --threads 2 --tile 8,3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("shapes", nargs="*", default=["128x768x3072", "128x3072x768"])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--turns", type=int, default=9)
p.add_argument("--tile", action="append", default=[], help="also force this register tile")
p.add_argument("--cpu-time", action="store_true", help="time in process CPU time")
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before tvm is imported
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import graphprune.codegen.cpu_rules as rules
from graphprune.codegen.sparse_rewrite import compile_probe, single_linear
from graphprune.codegen.target import make_target

CLOCK = time.process_time if ARGS.cpu_time else time.perf_counter
TARGET = make_target("llvm")
RULE_TILE, RULE_BLOCKS = rules.register_tile, rules.row_blocks


def build(w: np.ndarray, m: int, tile=None, blocks=None):
    """A callable running our compiled Linear, built with the rule's choices overridden."""
    rules.register_tile = (lambda *a, **k: tile) if tile else RULE_TILE
    rules.row_blocks = (lambda *a, **k: blocks) if blocks else RULE_BLOCKS
    try:
        vm, args = compile_probe(single_linear(w, m), None, TARGET, 16)
    finally:
        rules.register_tile, rules.row_blocks = RULE_TILE, RULE_BLOCKS
    f = vm["main"]
    return (lambda: f(*args)), args[0].numpy(), f(*args).numpy()


def ort_runner(w: np.ndarray, x: np.ndarray):
    m, k = x.shape
    n = w.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = ARGS.threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": x})[0]


def best_ms(runners: dict) -> dict:
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(ARGS.turns):
        for name, fn in runners.items():
            fn()
            t, calls = CLOCK(), 0
            while CLOCK() - t < 0.05:
                fn()
                calls += 1
            best[name] = min(best[name], (CLOCK() - t) / calls * 1e3)
    return best


def main():
    rng = np.random.default_rng(0)
    clock = "CPU time" if ARGS.cpu_time else "wall"
    print(f"{ARGS.threads} thread(s), {clock}, best of {ARGS.turns} turns; "
          f"load {', '.join(f'{v:.1f}' for v in os.getloadavg())}\n")  # fmt: skip
    print("| shape | variant | ms | GMAC/s | ORT ÷ variant | max abs err vs ORT |")
    print("|---|---|---|---|---|---|")
    for shape in ARGS.shapes:
        m, k, n = (int(v) for v in shape.split("x"))
        w = rng.standard_normal((n, k)).astype(np.float32)
        runners, outs = {}, {}
        runners["rule"], x, outs["rule"] = build(w, m)
        runners["no-mblock"], _, outs["no-mblock"] = build(w, m, blocks=1)
        for t in ARGS.tile:
            rt, ct = (int(v) for v in t.split(","))
            runners[f"tile {rt}x{ct}"], _, outs[f"tile {rt}x{ct}"] = build(w, m, tile=(rt, ct))
        runners["ort"] = ort_runner(w, x)
        ref = runners["ort"]()
        best = best_ms(runners)
        for name, ms in best.items():
            err = "" if name == "ort" else f"{float(np.abs(outs[name] - ref).max()):.1e}"
            print(f"| {shape} | {name} | {ms:.3f} | {m * k * n / 1e6 / ms:.1f} | "
                  f"{best['ort'] / ms:.2f} | {err} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
