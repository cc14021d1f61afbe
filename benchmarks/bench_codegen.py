"""Latency of compiled artifacts vs ONNX Runtime, OpenVINO and PyTorch eager, same weights.

The bar is what a user deploys with (issue 16): the same model exported to ONNX and run by ONNX
Runtime (all graph optimisations) or OpenVINO (CPU plugin, fp32), not PyTorch eager. For each
model and variant, batch 1:

* ``dense``: seeded weights (BN statistics measured on the example input, see :func:`seeded`);
* ``50% pruned``: ``graphprune.prune(ratio=0.5, criterion="l2")`` of the dense model. The
  transformers BERT is pruned with ``uniform=True`` (its default for transformers models: only
  what ``BertConfig`` can express, i.e. the FFN width; the MMACs column shows what that removes),
  so the pruned model is a ``BertModel`` that runs at batch 1;
* ``90% unstr.`` (BERT only): ``graphprune.sparsify(sparsity=0.9)`` (magnitude, unstructured),
  compiled with ``kernels="auto"``; the peers run the same zeros densely;
* ``2:4`` (BERT only): ``graphprune.sparsify(pattern="2:4")`` (magnitude), ``kernels="auto"``.

The parent process builds every row once into a work directory (the torch model, its ONNX export,
our artifact, the torch outputs), then runs one worker process per thread count (``--threads``,
default 1 and 2: TVM reads ``TVM_NUM_THREADS`` once, at start). A worker opens ONNX Runtime
(``intra_op_num_threads`` = T, ``inter_op`` 1, sequential) and OpenVINO (``INFERENCE_NUM_THREADS``
= T, ``INFERENCE_PRECISION_HINT`` f32, latency hint), checks every runtime's outputs against
torch's (max abs err; a runtime above ``--atol`` is not timed), then times torch, ours and the
peers in interleaved turns (``peers.time_turns``), best and median of ``--repeat`` calls.
The ratio column is **best peer ÷ ours** (medians; above 1 = we are faster).

    python benchmarks/bench_codegen.py            # ResNet-50 / MobileNetV2 / BERT-base seq 128
    python benchmarks/bench_codegen.py --quick    # small sizes (minutes on 2 cores)
    python benchmarks/bench_codegen.py --stock    # adds TVM's stock (unscheduled) pipeline
    python benchmarks/bench_codegen.py --tune 64  # adds a MetaSchedule-tuned column (64 trials)

A model whose build exceeds ``--build-budget`` seconds is retried at the next smaller size. The
table goes into BENCHMARKS.md between the ``bench_peers`` markers (``bench_peers_full`` for a
full-size run), with the CPU, date and load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--atol", type=float, default=1e-3,
                   help="a runtime whose outputs differ from torch's by more is not timed")
    p.add_argument("--build-budget", type=float, default=240.0, help="seconds per build")
    p.add_argument("--stock", action="store_true",
                   help="also time TVM's stock pipeline (unscheduled: minutes per full-size "
                        "model, which would push the default run past 15 minutes)")  # fmt: skip
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="also compile with compile(tune=True, trials=TRIALS) per model and "
                        "variant, each with a fresh tuning database (so every row pays its "
                        "own search; off by default: minutes per model)")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--benchmarks-md", default=None, help="the file to record in")
    p.add_argument("--only", nargs="*", help="model names to run (default: all)")
    p.add_argument("--variants", nargs="*", help="variants to run (default: all)")
    p.add_argument("--workdir", default=None, help="keep the built rows here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _args()
if ARGS.worker:  # one thread count per process: TVM reads this once, when its runtime starts
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads[0])
import numpy as np  # noqa: E402
import torch  # noqa: E402

import peers  # noqa: E402 - benchmarks/ is on sys.path
from full_models import bert, macs, mobilenet, resnet, seeded, variant_of  # noqa: E402
from record import PATH, cpu_name, write_block  # noqa: E402

torch.set_num_threads(ARGS.threads[0] if ARGS.worker else 2)
START, END = "<!-- bench_peers:start -->", "<!-- bench_peers:end -->"  # --quick runs
# Full-size runs (the rows) keep a block of their own, so neither replaces the other.
FULL_START, FULL_END = "<!-- bench_peers_full:start -->", "<!-- bench_peers_full:end -->"


FULL = {
    "ResNet-50": [lambda w: resnet(w), lambda w: resnet(w, (1, 1, 1, 1), 112)],
    "MobileNetV2": [lambda w: mobilenet(w), lambda w: mobilenet(w, 112)],
    "BERT-base": [lambda w: bert(w), lambda w: bert(w, layers=4)],
}
QUICK = {
    "ResNet-50": [lambda w: resnet(w * 0.25, (1, 1, 1, 1), 64)],
    "MobileNetV2": [lambda w: mobilenet(w * 0.5, 96)],
    "BERT-base": [lambda w: bert(w, layers=2, seq=128, d=256, heads=4)],
}
VARIANTS = {"ResNet-50": ("dense", "50% pruned"), "MobileNetV2": ("dense", "50% pruned"),
            "BERT-base": ("dense", "50% pruned", "90% unstr.", "2:4")}  # fmt: skip


def build_row(name, factories, variant, root: Path) -> dict:
    """Build one row into ``root/<name>-<variant>``: model.pt, inputs.pt, reference.npz,
    model.onnx, our artifact (and the stock / tuned ones when asked); returns its metadata."""
    from graphprune import codegen

    for factory in factories:
        model, inputs = seeded(factory, 1.0)
        dense_macs = macs(model, inputs)
        model, kw = variant_of(model, inputs, variant)
        d = root / f"{name}-{variant}".replace(" ", "_").replace("%", "pct")
        d.mkdir(parents=True, exist_ok=True)
        row = {"model": name, "variant": variant, "dir": str(d), "dense_macs": dense_macs,
               "shape": "x".join(map(str, inputs[0].shape)), "macs": macs(model, inputs)}  # fmt: skip
        ref = peers.flat_outputs(peers.run_torch(model, inputs))
        np.savez(d / "reference.npz", *ref)
        torch.save(model, d / "model.pt")
        torch.save(inputs, d / "inputs.pt")
        t = time.perf_counter()
        peers.export_onnx(model, inputs, d / "model.onnx")
        row["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        art = codegen.compile(model, inputs, out_dir=d / "ours", **kw)
        row["build_s"] = time.perf_counter() - t
        row["sparse_layers"] = sum(1 for r in art.manifest["kernels"].values()
                                   if r.get("sparsity", "dense") != "dense")  # fmt: skip
        if row["build_s"] > ARGS.build_budget and factory is not factories[-1]:
            print(f"  {name}: build took {row['build_s']:.0f}s > budget, trying a smaller size")
            continue
        if ARGS.stock:
            codegen.compile(model, inputs, out_dir=d / "stock", schedule="stock", **kw)
        if ARGS.tune > 0:
            t = time.perf_counter()
            tuned = codegen.compile(model, inputs, out_dir=d / "tuned", tune=True,
                                    trials=ARGS.tune, tuning_dir=d / "tuning-db", **kw)  # fmt: skip
            row["tune_s"] = time.perf_counter() - t
            row["tuned_kernels"] = len(tuned.manifest["tuning"]["metaschedule"])
        return row
    raise AssertionError("unreachable")


def _artifact_runner(art, arrays):
    return lambda: art(*arrays)


def measure_row(row: dict, threads: int) -> dict:
    """In a worker: every runtime's max abs err vs torch, then interleaved timings."""
    from graphprune.runtime import load

    d = Path(row["dir"])
    model = torch.load(d / "model.pt", weights_only=False).eval()
    inputs = torch.load(d / "inputs.pt")
    with np.load(d / "reference.npz") as f:
        ref = [f[k] for k in f.files]
    arrays = peers.as_arrays(inputs)
    runners = {"torch": peers.torch_runner(model, inputs)}
    for col in ("ours", "stock", "tuned"):
        if (d / col).exists():
            runners[col] = _artifact_runner(load(d / col), arrays)
    runners.update(peers.peer_runners(d / "model.onnx", arrays, threads))
    errs = {k: peers.max_abs_err(fn(), ref) for k, fn in runners.items()}
    bad = [k for k, e in errs.items() if not e <= ARGS.atol]
    timed = {k: fn for k, fn in runners.items() if k not in bad}
    ms = peers.time_turns(timed, ARGS.repeat)
    return {"errs": errs, "ms": {k: [t.best, t.median] for k, t in ms.items()}}


def worker(index: Path) -> None:
    rows = json.loads(index.read_text())
    threads = ARGS.threads[0]
    out = {}
    for key, row in rows.items():
        out[key] = measure_row(row, threads)
        ms = out[key]["ms"]
        print(f"  [{threads}T] {key}: " + ", ".join(f"{k} {v[1]:.2f}" for k, v in ms.items()),
              flush=True)  # fmt: skip
    (index.parent / f"times-{threads}.json").write_text(json.dumps(out))


def machine() -> str:
    from graphprune.codegen.target import detect_mcpu

    return f"{cpu_name()}, {os.cpu_count()} cores, mcpu={detect_mcpu()}"


def _ms(med: dict, key: str) -> str:
    return f"{med[key]:.2f}" if key in med else "not timed"


def ratio(peer_ms, ours_ms) -> str:
    return f"{peer_ms / ours_ms:.2f}" if peer_ms and ours_ms else "—"


def table(rows: list[dict], times: dict[int, dict]) -> tuple[str, list[str]]:
    """The markdown table (one line per row and thread count) and the goal lines."""
    cols = ["model", "variant", "input", "MMACs", "threads", "torch ms", "ours ms", "ORT ms",
            "OpenVINO ms", "**best peer ÷ ours**", "best-of ratio", "torch/ours",
            "pruned/dense ours", "pruned/dense MACs", "build s", "max abs err ours / ORT / OV"]  # fmt: skip
    extra = [c for c in ("stock", "tuned") if any(c in t[r["key"]]["ms"] for t in times.values()
                                                   for r in rows)]  # fmt: skip
    cols += [f"TVM {c} ms" for c in extra]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    misses = []
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        for threads, t in sorted(times.items()):
            m, e = t[r["key"]]["ms"], t[r["key"]]["errs"]
            med = {k: v[1] for k, v in m.items()}
            best = {k: v[0] for k, v in m.items()}
            peer = min((med[p] for p in peers.PEERS if p in med), default=None)
            peer_best = min((best[p] for p in peers.PEERS if p in best), default=None)
            ours = med.get("ours")
            lat = mac = ""
            dr = dense.get(r["model"])
            if dr is not None and dr is not r and ours and "ours" in t[dr["key"]]["ms"]:
                lat = f"{ours / t[dr['key']]['ms']['ours'][1]:.2f}"
                mac = f"{r['macs'] / dr['macs']:.2f}"
            fmt = functools.partial(_ms, med)
            errs = " / ".join(f"{e[k]:.1e}" for k in ("ours", "ort", "openvino"))
            lines.append("| " + " | ".join([
                r["model"], r["variant"], r["shape"], f"{r['macs'] / 1e6:.0f}", str(threads),
                fmt("torch"), fmt("ours"), fmt("ort"), fmt("openvino"),
                f"**{ratio(peer, ours)}**", ratio(peer_best, best.get("ours")),
                ratio(med.get("torch"), ours), lat, mac, f"{r['build_s']:.0f}", errs,
                *[fmt(c) for c in extra]]) + " |")  # fmt: skip
            need = {"90% unstr.": 3.0, "2:4": 1.3}.get(r["variant"], 1.0)
            if not (peer and ours) or peer / ours < need:
                misses.append(f"{r['model']} {r['variant']} {threads}T "
                              f"({ratio(peer, ours)} < {need:g})")  # fmt: skip
    return "\n".join(lines), misses


def goals(rows, times, misses) -> str:
    """The issue's goals, checked on this run's numbers (nothing here is hard-coded)."""
    errs = [f"{r['model']} {r['variant']} {th}T ({t[r['key']]['errs']['ours']:.1e})"
            for r in rows for th, t in times.items()
            if not t[r["key"]]["errs"]["ours"] <= 1e-4]  # fmt: skip
    slow = [f"{r['model']} {r['variant']} ({r['build_s']:.0f} s)" for r in rows
            if r["build_s"] > 60]  # fmt: skip
    verdict = lambda bad: "met on every row" if not bad else "NOT met: " + ", ".join(bad)
    return (
        f"- best peer ÷ ours >= 1.0 (>= 3 for 90% unstructured, >= 1.3 for 2:4), 1 and 2 "
        f"threads: "
        f"{verdict(misses)}.\n"
        f"- max abs err vs PyTorch <= 1e-4: {verdict(errs)}.\n"
        f"- compile (untuned) under 60 s per model: {verdict(slow)}.\n"
    )


LOAD0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
T0 = time.time()


def _after_quick_block(text: str, block: str) -> str:
    """A new full-size block goes right after the quick one (else at the end)."""
    if END in text:
        at = text.index(END) + len(END)
        return text[:at] + "\n\n" + block + text[at:]
    return text.rstrip() + "\n\n" + block + "\n"


def main() -> int:
    if ARGS.worker:
        worker(Path(ARGS.worker))
        return 0
    suite = QUICK if ARGS.quick else FULL
    keep = ARGS.workdir is not None
    root = Path(ARGS.workdir or tempfile.mkdtemp(prefix="bench_codegen-"))
    rows = []
    for name, factories in suite.items():
        if ARGS.only and name not in ARGS.only:
            continue
        for variant in VARIANTS[name]:
            if ARGS.variants and variant not in ARGS.variants:
                continue
            row = build_row(name, factories, variant, root)
            row["key"] = f"{name} {variant}"
            rows.append(row)
            print(f"  built {row['key']}: {row['shape']}, {row['macs'] / 1e6:.0f} MMACs, "
                  f"build {row['build_s']:.0f} s", flush=True)  # fmt: skip
    index = root / "rows.json"
    index.write_text(json.dumps({r["key"]: r for r in rows}))
    times = {}
    for threads in ARGS.threads:
        cmd = [sys.executable, __file__, "--worker", str(index), "--threads", str(threads),
               "--repeat", str(ARGS.repeat), "--atol", str(ARGS.atol)]  # fmt: skip
        subprocess.run(cmd, check=True)
        times[threads] = json.loads((root / f"times-{threads}.json").read_text())
    result, misses = table(rows, times)
    print(result)
    print(goals(rows, times, misses))
    if not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    if not ARGS.no_write:
        date = dt.date.today().isoformat()
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        import onnxruntime
        import openvino

        body = (
            f"## Codegen vs ONNX Runtime and OpenVINO (bench_codegen.py)\n\n"
            f"`python benchmarks/bench_codegen.py{' --quick' if ARGS.quick else ''}` on {date}, "
            f"{machine()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"openvino {openvino.__version__}. Load average (1/5/15 min) {LOAD0} at the start, "
            f"{load} at the end: the 2 cores are shared with other jobs, so absolute times are "
            f"noisy and the 2-thread rows especially (a second thread competes with them). "
            f"Batch 1; ms are the median of {ARGS.repeat} calls per runtime, taken in "
            f"{peers.TURNS} interleaved turns over torch, ours, ORT and OpenVINO in one process "
            f"per thread count; \"best-of ratio\" uses each runtime's best call instead. Same "
            f"weights for all: the peers run the model's ONNX export (opset 17). Whole run "
            f"{(time.time() - T0) / 60:.0f} min."
            f"{' Quick mode: small sizes, not the issue rows.' if ARGS.quick else ''}\n\n"
            f"{result}\n\nGoals on this run (issue 16):\n{goals(rows, times, misses)}"
        )
        marks = (START, END) if ARGS.quick else (FULL_START, FULL_END)
        write_block(*marks, body, path=ARGS.benchmarks_md or PATH,
                    insert=_after_quick_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
