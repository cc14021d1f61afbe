"""Memory and time of an ONNX model with external data through capture, prune, save and run.

Writes ``x(1, H) -MatMul (H, W)-> Relu -MatMul (W, H)-> y`` with ``2·H·W`` fp32 weights as a
``.onnx`` plus external data, then runs ``gp.capture(path)``, ``gp.prune(path, graph=pg)``,
``save_onnx`` and onnxruntime on the saved model in one process, and prints for each stage its
time, the resident set size after it and its own peak (``VmHWM``, reset before each stage), both
above the RSS before capture, in GB and in multiples of the weights' bytes. Past protobuf's 2 GB
(``--hidden 16384 --width 16400``: 2.15 GB) onnxruntime goes through files
(``graphprune.frontends.onnx.files.on_disk``); the checker and shape inference run on the
weightless skeleton at any size.

    .venv/bin/python benchmarks/bench_onnx_large.py [--hidden 4096 --width 12288] [--dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    import graphprune as gp
    from graphprune.frontends.onnx import files
    from graphprune.frontends.onnx.session import run_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    h, w = args.hidden, args.width
    folder = tempfile.mkdtemp(prefix="onnx_large_", dir=args.dir)
    rows = []
    base = 0

    def start() -> float:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return time.time()

    def stage(name: str, t0: float) -> None:
        rows.append((name, time.time() - t0, (kib("VmRSS") - base) / 1e6 * 1.024,
                     (kib("VmHWM") - base) / 1e6 * 1.024))  # fmt: skip

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
        build_s = time.time() - t0
        gp.capture(os.path.join(os.path.dirname(__file__), "..", "tests", "data", "optimum",
                                "vit.onnx"))  # warm: imports, onnxslim, onnxruntime
        t0 = start()
        base = kib("VmRSS")
        pg = gp.capture(path)
        stage("gp.capture (load, check, fold, infer, import)", t0)
        t0 = start()
        res = gp.prune(path, ratio=0.5, graph=pg)
        stage("gp.prune (write + verify in onnxruntime)", t0)
        t0 = start()
        out = files.save_onnx(res.model, os.path.join(folder, "pruned.onnx"))
        stage(f"save_onnx ({'external data' if len(out) > 1 else 'one file'})", t0)
        del res, pg
        t0 = start()
        run_onnx(out[0], {"x": rng.standard_normal((1, h), dtype=np.float32)})
        stage("run the saved model", t0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"weights {weights_gb:.2f} GB (hidden {h}, width {w}; built in {build_s:.0f} s); load "
          f"average {load}; RSS and peaks above the RSS before capture\n")
    print("| stage | s | RSS after GB | stage peak GB | peak / weights |\n|---|---|---|---|---|")
    for name, s, rss, peak in rows:
        print(f"| {name} | {s:.1f} | {rss:.2f} | {peak:.2f} | {peak / weights_gb:.1f} |")


if __name__ == "__main__":
    main()
