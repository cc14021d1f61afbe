"""Memory and time of an ONNX model with external data through load, capture, prune and save.

Writes ``x(1, H) -MatMul (H, W)-> Relu -MatMul (W, H)-> y`` with ``2·H·W`` fp32 weights as a
``.onnx`` plus external data, then times each stage of ``gp.prune(path)`` in one process and
prints the resident set size after it and the peak so far (``ru_maxrss``), against the weights'
size. Past protobuf's 2 GB (``--hidden 16384 --width 16400``: 2.15 GB) the checker, shape
inference and onnxruntime go through files (``graphprune.frontends.onnx.files.on_disk``).

    .venv/bin/python benchmarks/bench_onnx_large.py [--hidden 4096 --width 12288] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1e6


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def main() -> None:
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper

    import graphprune as gp
    from graphprune.frontends.onnx import files
    from graphprune.frontends.onnx.session import run_onnx
    from graphprune.frontends.onnx.shapes import prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    h, w = args.hidden, args.width
    folder = tempfile.mkdtemp(prefix="onnx_large_", dir=args.dir)
    rows = []

    def stage(name: str, t0: float) -> None:
        rows.append((name, time.time() - t0, rss_gb(), peak_gb()))

    try:
        t0 = time.time()
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                 helper.make_node("Relu", ["h"], ["r"], name="act"),
                 helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]  # fmt: skip
        inits = [onnx.numpy_helper.from_array(rng.standard_normal(s, dtype=np.float32), n)
                 for n, s in (("w1", (h, w)), ("w2", (w, h)))]  # fmt: skip
        g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [1, h])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [1, h])], inits)  # fmt: skip
        path = os.path.join(folder, "wide.onnx")
        files.save_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path,
                        external_data=True)  # fmt: skip
        del g, inits
        weights_gb = os.path.getsize(path + ".data") / 1e9
        stage("build + save", t0)
        t0 = time.time()
        model, _ = files.load_onnx(path)
        stage("load (external data)", t0)
        t0 = time.time()
        files.check_model(model)
        stage("onnx.checker", t0)
        t0 = time.time()
        folded, _ = prepare(model)
        stage("fold shapes (onnxslim)", t0)
        t0 = time.time()
        inferred = files.infer_shapes(folded)
        gs.import_onnx(inferred)
        stage("shape inference + import", t0)
        del model, folded, inferred
        t0 = time.time()
        pg = gp.capture(path)
        stage("gp.capture (all of the above)", t0)
        t0 = time.time()
        res = gp.prune(path, ratio=0.5, graph=pg)
        stage("gp.prune (write + verify in onnxruntime)", t0)
        t0 = time.time()
        out = files.save_onnx(res.model, os.path.join(folder, "pruned.onnx"))
        stage(f"save_onnx ({'external data' if len(out) > 1 else 'one file'})", t0)
        t0 = time.time()
        run_onnx(out[0], {"x": rng.standard_normal((1, h), dtype=np.float32)})
        stage("run the saved model", t0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"weights {weights_gb:.2f} GB (hidden {h}, width {w}); load average {load}\n")
    print("| stage | s | RSS after GB | peak RSS GB | peak / weights |\n|---|---|---|---|---|")
    for name, s, rss, peak in rows:
        print(f"| {name} | {s:.1f} | {rss:.2f} | {peak:.2f} | {peak / weights_gb:.1f} |")


if __name__ == "__main__":
    main()
