"""ONNX capture's memory: how many copies of the weights it holds at its peak (issue 15).

Capture folds the model's shape subgraphs with onnxslim (whose own shape inference is replaced by
one on the weightless skeleton), checks and shape-infers skeletons, folds a model it loaded
itself in place, and imports the folded graph from its skeleton with the weights read once. The
figures for larger models are in ``benchmarks/bench_onnx_large.py``; this pins them on ~200 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PEAK_SCRIPT = r"""
import ctypes, gc, json, os, sys
from pathlib import Path
import numpy as np, onnx
from onnx import TensorProto, helper
import graphprune as gp
from graphprune.frontends.onnx import files

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

folder, batch = sys.argv[1], sys.argv[2]
h, w = 2048, 12288  # 2 x 2048 x 12288 fp32 = 201 MB
rng = np.random.default_rng(0)
nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
inits = [onnx.numpy_helper.from_array(rng.standard_normal(s, dtype=np.float32), n)
         for n, s in (("w1", (h, w)), ("w2", (w, h)))]
b = 1 if batch == "static" else "batch"
g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, h])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, h])], inits)
path = os.path.join(folder, "wide.onnx")
files.save_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path,
                external_data=True)
del g, inits
nbytes = os.path.getsize(path + ".data")
small = os.path.join(folder, "small.onnx")  # warm: imports, onnxslim, onnxruntime
files.save_onnx(helper.make_model(helper.make_graph(nodes[1:2], "s", [
    helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])], [
    helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])]),
    opset_imports=[helper.make_opsetid("", 17)]), small)
gp.capture(small)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
pg = gp.capture(path)
peak = (kib("VmHWM") - base) * 1024 / nbytes
assert pg.weights["w1"].shape == (h, w)
print(json.dumps({"peak": peak}))
"""


@pytest.mark.parametrize("batch, limit", [
    ("static", 3.5), pytest.param("dynamic", 4.5, marks=pytest.mark.heavy)])  # fmt: skip
def test_capture_peak_memory(tmp_path, batch, limit):
    """Peak RSS of ``gp.capture(path)`` above its baseline, in weight bytes. Measured 3.3x (the
    loaded model, onnxslim's folded copy and its export's transient) and 4.3x with a symbolic
    batch (a second fold at another batch size) when written; 8.3x and 13.5x before (the
    checker's and shape inference's serialised copies, onnxslim's shape inference, a copy per
    fix of the dims, both folds' weights loaded to compare them, the loaded model, the folded
    model and the graph's arrays all alive at once)."""
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path), batch],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    print(f"{batch}: peak {peak:.2f}x")
    assert peak <= limit, f"{batch}: capture peaked at {peak:.2f}x the weights' bytes"
