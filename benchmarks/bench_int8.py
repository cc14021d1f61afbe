"""INT8 GEMMs: our kernels vs ONNX Runtime's and OpenVINO's INT8, BERT-base shapes, one run.

One Linear ``[M, K] -> [M, N]`` (M = 128 tokens: BERT-base, batch 1, sequence 128) per shape
``K x N`` in {768x768, 768x3072, 3072x768}, the same random weights (and bias) for every column:

* ``ours fp32``: ``gp.compile`` of the torch Linear (our scheduled dense GEMM);
* ``ours int8 VNNI``: the dynamic one built for ``mcpu=icelake-server`` (AVX-512 VNNI, no AMX),
  where the CPU has AMX: what the kernels do on a CPU without tiles;
* ``ours int8 dyn`` / ``ours int8 static``: ``gp.compile`` with the weight's ``QuantSpec``
  (``w8a8_dynamic``: per-token activation scales at run time; ``w8a8_static``: one scale,
  max |x| of the benchmark input / 127) on the graph: our activation quantizer + INT8 GEMM
  (AMX tiles where the CPU has them, else AVX-512 VNNI, else AVX2), dequantized in the kernel;
* ``ORT int8 dyn``: ``onnxruntime.quantization.quantize_dynamic`` of the ONNX export
  (per-channel int8 weights; ORT fuses it to ``DynamicQuantizeMatMul``/``MatMulInteger``);
* ``ORT int8 QDQ``: ``quantize_static`` (QDQ format, per-channel int8 weights, one activation
  scale calibrated on the same input) and ``OV int8 QDQ``: OpenVINO compiling that QDQ model
  (it runs the quantized MatMul in int8, with AMX on Xeons that have it);
* ``ORT fp32`` for reference.

Each column is checked once against the float product (relative error printed; a column above
5% is refused, not timed), then all are timed in interleaved turns (``benchmarks/peers.py``),
median of the calls; ``best peer / ours`` = fastest int8 peer over ``ours int8 dyn`` (> 1: ours
is faster). One worker process per thread count (TVM reads ``TVM_NUM_THREADS`` at start).

    python benchmarks/bench_int8.py                # 1 and 2 threads, writes BENCHMARKS.md
    python benchmarks/bench_int8.py --no-write --threads 1

Then (``--bert-layers``, default 2) a whole encoder: ``transformers`` BERT at BERT-base widths
(768 hidden, 12 heads, 3072 FFN; ``full_models.bert``) with 2 layers, random weights, batch 1,
sequence 128; ours fp32
and ``gp.compile(gp.quantize(model, scheme="w8a8_dynamic"))`` (every Linear but the pooler head
int8) against ONNX Runtime fp32 and ``quantize_dynamic`` of the ONNX export.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
p.add_argument("--repeat", type=int, default=20, help="timed calls per column")
p.add_argument("--m", type=int, default=128)
p.add_argument("--bert-layers", type=int, default=2,
               help="also a BERT-base-width encoder of this many layers, whole model (0: skip)")
p.add_argument("--no-write", action="store_true")
p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
ARGS = p.parse_args()
if ARGS.worker is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.worker)

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import cpu_name, md_table, write_block

SHAPES = [(768, 768), (768, 3072), (3072, 768)]
START, END = "<!-- bench_int8:start -->", "<!-- bench_int8:end -->"
COLUMNS = ["ours fp32", "ours int8 dyn", "ours int8 static", "ours int8 VNNI", "ORT fp32",
           "ORT int8 dyn", "ORT int8 QDQ", "OV int8 QDQ"]  # fmt: skip
PEERS_INT8 = ["ORT int8 dyn", "ORT int8 QDQ", "OV int8 QDQ"]
VNNI_TARGET = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": len(os.sched_getaffinity(0))}


def _quantized_onnx(fp32_path: Path, x: np.ndarray, tmp: Path) -> tuple[Path, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    dyn = tmp / "dyn.onnx"
    quantize_dynamic(str(fp32_path), str(dyn), per_channel=True, weight_type=QuantType.QInt8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"in0": x}])

        def get_next(self):
            return next(self.items, None)

    qdq = tmp / "qdq.onnx"
    quantize_static(str(fp32_path), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})  # fmt: skip
    return dyn, qdq


def _ours(model, x, tmp: Path, scheme: str | None, target="llvm"):
    import graphprune as gp
    from graphprune.ir.quant import QuantSpec, weight_scales

    inputs = (x,)
    pg = None
    if scheme is not None:
        pg = gp.capture(model, inputs)
        w = model.weight.detach().numpy()
        act = float(np.abs(x.numpy()).max() / 127) if scheme == "w8a8_static" else None
        pg.quant["weight"] = QuantSpec(scheme, weight_scales(w, 0), 0, act)
    tag = scheme if target == "llvm" else f"{scheme}_{target['mcpu']}"
    art = gp.compile(model, inputs, out_dir=tmp / f"art_{tag}", graph=pg, target=target)
    if scheme is not None:
        rec = art.manifest["kernels"]["quant:weight"]
        assert rec["kernel"] == "int8", rec
    xa = x.numpy()
    return lambda: [art(xa)], art


def measure(threads: int) -> list[dict]:
    import torch
    from peers import export_onnx, openvino_runner, ort_runner, time_turns

    torch.set_num_threads(threads)
    rows = []
    for k, n in SHAPES:
        torch.manual_seed(0)
        model = torch.nn.Linear(k, n).eval()
        x = torch.randn(ARGS.m, k)
        ref = (x @ model.weight.T + model.bias).detach().numpy().astype(np.float64)
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            onnx_path = export_onnx(model, (x,), tmp / "fp32.onnx")
            dyn, qdq = _quantized_onnx(onnx_path, x.numpy(), tmp)
            arrays = [x.numpy()]
            calls = {}
            calls["ours fp32"], _ = _ours(model, x, tmp, None)
            calls["ours int8 dyn"], art = _ours(model, x, tmp, "w8a8_dynamic")
            calls["ours int8 static"], _ = _ours(model, x, tmp, "w8a8_static")
            if art.manifest["kernels"]["quant:weight"]["isa"] == "amx":
                # the same kernels without AMX: a VNNI target (what a Cascade/Ice Lake runs)
                calls["ours int8 VNNI"], _ = _ours(model, x, tmp, "w8a8_dynamic", VNNI_TARGET)
            calls["ORT fp32"] = ort_runner(onnx_path, arrays, threads)
            calls["ORT int8 dyn"] = ort_runner(dyn, arrays, threads)
            calls["ORT int8 QDQ"] = ort_runner(qdq, arrays, threads)
            calls["OV int8 QDQ"] = openvino_runner(qdq, arrays, threads)
            errs = {}
            for name, fn in list(calls.items()):
                got = np.asarray(fn()[0], np.float64).reshape(ref.shape)
                errs[name] = float(np.abs(got - ref).max() / np.abs(ref).max())
                if errs[name] > 0.05:
                    print(f"  {name}: relative error {errs[name]:.3f} > 5%, not timed")
                    del calls[name]
            t = time_turns(calls, ARGS.repeat)
            rows.append({"shape": f"{k}x{n}", "threads": threads, "isa": art.manifest["kernels"]
                         ["quant:weight"]["isa"], "ms": {c: t[c].median for c in t},
                         "best_ms": {c: t[c].best for c in t}, "err": errs})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


BERT_COLUMNS = ["ours fp32", "ours int8 dyn", "ORT fp32", "ORT int8 dyn"]


def measure_bert(threads: int) -> dict:
    import torch
    from full_models import bert
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from peers import as_arrays, export_onnx, flat_outputs, ort_runner, time_turns

    import graphprune as gp

    torch.manual_seed(0)
    model, inputs = bert(layers=ARGS.bert_layers, seq=ARGS.m)
    with torch.no_grad():
        ref = flat_outputs(model(*inputs))[0].astype(np.float64)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        onnx_path = export_onnx(model, inputs, tmp / "bert.onnx")
        dyn = tmp / "bert_int8.onnx"
        quantize_dynamic(str(onnx_path), str(dyn), per_channel=True, weight_type=QuantType.QInt8)
        art32 = gp.compile(model, inputs, out_dir=tmp / "fp32")
        res = gp.quantize(model, inputs, scheme="w8a8_dynamic")
        art8 = gp.compile(res, inputs, out_dir=tmp / "int8")
        kinds = [v["kernel"] for k, v in art8.manifest["kernels"].items() if k.startswith("quant:")]
        ia = as_arrays(inputs)
        calls = {"ours fp32": lambda: flat_outputs(art32(*ia)),
                 "ours int8 dyn": lambda: flat_outputs(art8(*ia)),
                 "ORT fp32": ort_runner(onnx_path, ia, threads),
                 "ORT int8 dyn": ort_runner(dyn, ia, threads)}  # fmt: skip
        errs = {n: float(np.abs(np.asarray(fn()[0], np.float64).reshape(ref.shape) - ref).max()
                         / np.abs(ref).max()) for n, fn in calls.items()}  # fmt: skip
        t = time_turns(calls, ARGS.repeat)
    row = {"threads": threads, "ms": {c: t[c].median for c in t},
           "best_ms": {c: t[c].best for c in t}, "err": errs,
           "int8_layers": f"{kinds.count('int8')}/{len(kinds)}"}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def render_bert(rows: list[dict]) -> str:
    head = ["threads", *BERT_COLUMNS, "ORT int8 / ours int8", "same, best-of calls",
            "ours int8 layers", "rel. err ours int8", "rel. err ORT int8"]  # fmt: skip
    body = []
    for r in rows:
        ms, bm = r["ms"], r["best_ms"]
        body.append([r["threads"], *[f"{ms[c]:.2f}" for c in BERT_COLUMNS],
                     f"{ms['ORT int8 dyn'] / ms['ours int8 dyn']:.2f}",
                     f"{bm['ORT int8 dyn'] / bm['ours int8 dyn']:.2f}", r["int8_layers"],
                     f"{r['err']['ours int8 dyn']:.4f}", f"{r['err']['ORT int8 dyn']:.4f}"])  # fmt: skip
    return md_table(head, body)


def render(rows: list[dict]) -> str:
    head = ["shape K×N", "threads", *COLUMNS, "best int8 peer", "best peer / ours int8 dyn",
            "same, best-of calls", "ours fp32 / ours int8"]  # fmt: skip
    body = []
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[c]:.3f}" if c in ms else "refused" for c in COLUMNS]
        peers = {c: ms[c] for c in PEERS_INT8 if c in ms}
        best = min(peers, key=peers.get) if peers else None
        ours = ms.get("ours int8 dyn")
        ratio = f"{peers[best] / ours:.2f}" if best and ours else "-"
        speed = f"{ms['ours fp32'] / ours:.2f}×" if ours and "ours fp32" in ms else "-"
        bm = r["best_ms"]
        bpeer = min((bm[c] for c in PEERS_INT8 if c in bm), default=None)
        bratio = f"{bpeer / bm['ours int8 dyn']:.2f}" if bpeer and "ours int8 dyn" in bm else "-"
        body.append([r["shape"], r["threads"], *cells, best or "-", ratio, bratio, speed])
    errs = [[r["shape"], r["threads"], *[f"{r['err'].get(c, float('nan')):.4f}" for c in COLUMNS]]
            for r in rows if r["threads"] == rows[0]["threads"]]  # fmt: skip
    return (md_table(head, body) + "\n\nMax |error| / max |y| against the float64 product "
            "(same input, first thread count):\n\n" + md_table(["shape K×N", "threads", *COLUMNS],
                                                               errs))  # fmt: skip


def throughput(rows: list[dict]) -> str:
    """Best-call int8 ops per second, 1 thread, ours vs the fastest int8 peer, per shape: an
    AVX-512 VNNI core peaks at 2 vpdpbusd (128 multiply-adds) per cycle, so a peer well above
    that per core is using another unit (AMX on Xeons that have it)."""
    parts = []
    for r in rows:
        if r["threads"] != 1 or "ours int8 dyn" not in r["best_ms"]:
            continue
        k, n = (int(v) for v in r["shape"].split("x"))
        ops = 2 * ARGS.m * k * n
        bm = r["best_ms"]
        peer = min((c for c in PEERS_INT8 if c in bm), key=bm.get, default=None)
        if peer:
            parts.append(f"{r['shape']}: ours {ops / bm['ours int8 dyn'] / 1e6:.0f}, {peer} "
                         f"{ops / bm[peer] / 1e6:.0f}")  # fmt: skip
    return ("Int8 GOPS of the best call, 1 thread (whole call, overheads included): "
            + "; ".join(parts) + ".") if parts else ""


def main() -> int:
    if ARGS.worker is not None:
        rows = measure(ARGS.worker)
        print("ROWS " + json.dumps(rows))
        if ARGS.bert_layers:
            print("BERT " + json.dumps(measure_bert(ARGS.worker)))
        return 0
    import onnxruntime
    import openvino

    load0 = os.getloadavg()
    t0 = time.time()
    rows, bert = [], []
    for th in ARGS.threads:
        out = subprocess.run([sys.executable, __file__, "--worker", str(th), "--repeat",
                              str(ARGS.repeat), "--m", str(ARGS.m), "--bert-layers",
                              str(ARGS.bert_layers)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        sys.stderr.write(out.stderr[-3000:] if out.returncode else "")
        found = [ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")]
        if not found:
            print(out.stdout[-3000:])
            raise SystemExit(f"worker for {th} threads failed (rc {out.returncode})")
        rows += json.loads(found[0][5:])
        bert += [json.loads(ln[5:]) for ln in out.stdout.splitlines() if ln.startswith("BERT ")]
    load1 = os.getloadavg()
    isa = rows[0]["isa"]
    table = render(rows)
    if bert:
        table += (f"\n\nWhole encoder: BERT-base widths, {ARGS.bert_layers} layers, random "
                  f"weights, batch 1, sequence {ARGS.m} (ms, median; relative error of the "
                  f"first output against torch fp32):\n\n" + render_bert(bert))
    head = (
        f"`python benchmarks/bench_int8.py` on {datetime.date.today()}, {cpu_name()}, "
        f"{len(os.sched_getaffinity(0))} cores; our int8 path: {isa}; onnxruntime "
        f"{onnxruntime.__version__}, openvino {openvino.__version__}. Load average (1/5/15 min) "
        f"{', '.join(f'{v:.1f}' for v in load0)} at the start, "
        f"{', '.join(f'{v:.1f}' for v in load1)} at the end: the cores are shared with other "
        f"jobs, so times are noisy (the 2-thread rows especially). One Linear, M = {ARGS.m} "
        f"rows (BERT-base, sequence {ARGS.m}), random weights and input, same for every "
        f"column; ms = median of {ARGS.repeat} calls per column in 5 interleaved turns, one "
        f"process per thread count. Ours are whole artifacts (`gp.compile`, the loader's call "
        f"included); ours int8 = activation quantizer + INT8 GEMM with dequantize + bias in "
        f"its epilogue. {throughput(rows)} Whole run {time.time() - t0:.0f} s."
    )
    print(head + "\n\n" + table)
    if not ARGS.no_write:
        write_block(START, END, "## INT8 GEMMs vs ONNX Runtime and OpenVINO INT8 (bench_int8)"
                    "\n\n" + head + "\n\n" + table)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
