"""Where we lose to ONNX Runtime and OpenVINO: our per-kernel profile beside theirs, one model.

Ours: :func:`graphprune.codegen.profile.profile_artifact` (each PrimFunc timed with
``time_evaluator`` on the arguments the model calls it with). ONNX Runtime: its profiler
(``enable_profiling``; the JSON's per-node ``*_kernel_time`` events, mean over the runs).
OpenVINO: ``PERF_COUNT`` and ``InferRequest.profiling_info`` (per executed layer, ``real_time``,
mean over the runs), output shapes from the runtime model. All three on the same weights (the
peers run the model's ONNX export), fp32, batch 1, ``--threads`` threads.

Printed: wall times; totals per op category (conv, gemm, attention, softmax, norm, pool/reduce,
data movement, elementwise: :func:`graphprune.codegen.profile.category`); the top ``--top``
kernels/ops of each runtime side by side; and the conv and GEMM layers matched across the three
(same category and output size, in execution order) with the largest "ours − best peer".

    python benchmarks/profile_kernels.py --model ResNet-50 [--variant "50% pruned"] [--quick]
    python benchmarks/profile_kernels.py --model BERT-base --threads 1 --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="ResNet-50", choices=["ResNet-50", "MobileNetV2", "BERT-base"])
p.add_argument("--variant", default="dense", choices=["dense", "50% pruned", "90% unstr.", "2:4"])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--runs", type=int, default=20, help="profiled peer runs (after 3 warm-up runs)")
p.add_argument("--top", type=int, default=12)
p.add_argument("--quick", action="store_true", help="bench_codegen's quick sizes")
p.add_argument("--write", action="store_true", help="record in BENCHMARKS.md (own block)")
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before tvm is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

import peers  # noqa: E402 - benchmarks/ is on sys.path
from full_models import bert, macs, mobilenet, resnet, seeded, variant_of  # noqa: E402
from graphprune import codegen  # noqa: E402
from graphprune.codegen.profile import category, profile_artifact  # noqa: E402
from record import cpu_name, write_block  # noqa: E402

torch.set_num_threads(ARGS.threads)
FACTORY = {
    ("ResNet-50", False): lambda: resnet(),
    ("MobileNetV2", False): lambda: mobilenet(),
    ("BERT-base", False): lambda: bert(),
    ("ResNet-50", True): lambda: resnet(0.25, (1, 1, 1, 1), 64),
    ("MobileNetV2", True): lambda: mobilenet(0.5, 96),
    ("BERT-base", True): lambda: bert(layers=2, seq=128, d=256, heads=4),
}


@dataclass
class Op:
    """One layer of one runtime: name, op type, ms per model run, output elements, position;
    ``label`` is what the tables show (OpenVINO: type and the kernel it picked)."""

    name: str
    kind: str
    ms: float
    out_elems: int
    order: int
    label: str = ""

    @property
    def category(self) -> str:
        return category(self.kind)


def ours_ops(art, inputs) -> tuple[list[Op], float]:
    prof = profile_artifact(art, inputs)
    for note in prof.notes:
        print("  ours: not timed:", note)
    # one Op per call, in call order (peers report each layer once per run)
    ops = [Op(prof.kernels[i].name, prof.kernels[i].name, prof.kernels[i].best_ms,
              prof.kernels[i].out_elems, pos) for pos, i in enumerate(prof.sequence)]  # fmt: skip
    return ops, prof.wall_ms


def ort_ops(onnx_path, arrays, tmp: Path) -> tuple[list[Op], float]:
    sess = peers.ort_session(onnx_path, ARGS.threads, profile_prefix=str(tmp / "ort"))
    feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
    for _ in range(3):
        sess.run(None, feed)
    for _ in range(ARGS.runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, list] = defaultdict(list)
    meta, walls = {}, []
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            walls.append(ev["dur"] / 1e3)
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        per[name].append(ev["dur"] / 1e3)
        if name not in meta:
            shapes = ev["args"].get("output_type_shape") or [{}]
            dims = next(iter(shapes[0].values()), []) if shapes else []
            meta[name] = (ev["args"].get("op_name", "?"), int(np.prod(dims)) if dims else 0,
                          len(meta))  # fmt: skip
    ops = []
    for n, v in per.items():
        calls = max(1, len(v) // (ARGS.runs + 3))  # per run; the first 3 runs were warm-up
        # best, not mean or median: on shared cores preemptions add milliseconds to many calls
        ms = float(np.min(v[-ARGS.runs * calls:])) * calls
        ops.append(Op(n, meta[n][0], ms, meta[n][1], meta[n][2]))
    return ops, float(np.median(walls[-ARGS.runs:])) if walls else float("nan")


def openvino_ops(onnx_path, arrays) -> tuple[list[Op], float]:
    import time

    compiled = peers.openvino_compiled(onnx_path, ARGS.threads, perf_count=True)
    req = compiled.create_infer_request()
    for _ in range(3):
        req.infer(arrays)
    acc: dict[str, list] = defaultdict(list)
    kinds, walls = {}, []
    for _ in range(ARGS.runs):
        t = time.perf_counter()
        req.infer(arrays)
        walls.append((time.perf_counter() - t) * 1e3)
        for info in req.profiling_info:
            if str(info.status).endswith("EXECUTED") and "NOT" not in str(info.status):
                acc[info.node_name].append(info.real_time.total_seconds() * 1e3)
                kinds[info.node_name] = (info.node_type, f"{info.node_type}:{info.exec_type}")
    sizes, order = {}, {}
    for i, op in enumerate(compiled.get_runtime_model().get_ordered_ops()):
        name = op.get_friendly_name()
        order[name] = i
        if op.get_output_size():
            shape = op.get_output_partial_shape(0)
            sizes[name] = int(np.prod(shape.to_shape())) if shape.is_static else 0
    ops = [Op(n, kinds[n][0], float(np.min(v)), sizes.get(n, 0), order.get(n, 10**6),
              kinds[n][1]) for n, v in acc.items()]  # fmt: skip
    return ops, float(np.median(walls))


def by_category(ops: list[Op]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for o in ops:
        out[o.category] += o.ms
    return out


def match_layers(runs: dict[str, list[Op]]) -> list[tuple[str, int, int, dict[str, Op]]]:
    """Conv and GEMM layers matched across runtimes: the k-th layer of a category with a given
    output size in execution order, where every runtime has one (padded widths do not match)."""
    keyed: dict[str, dict[tuple, Op]] = {}
    for rt, ops in runs.items():
        seen: dict[tuple, int] = defaultdict(int)
        keyed[rt] = {}
        for o in sorted(ops, key=lambda o: o.order):
            if o.category not in ("conv", "gemm") or not o.out_elems:
                continue
            key = (o.category, o.out_elems)
            keyed[rt][(*key, seen[key])] = o
            seen[key] += 1
    common = set.intersection(*(set(k) for k in keyed.values()))
    return [(k[0], k[1], k[2], {rt: keyed[rt][k] for rt in runs}) for k in common]


def report(runs: dict[str, list[Op]], walls: dict[str, float]) -> str:
    names = list(runs)
    out = ["wall ms per run: " + ", ".join(f"{n} {walls[n]:.3f}" for n in names), ""]
    cats = {n: by_category(runs[n]) for n in names}
    allcats = sorted({c for d in cats.values() for c in d}, key=lambda c: -cats["ours"].get(c, 0))
    out.append("| category | " + " | ".join(f"{n} ms" for n in names) + " | ours − best peer |")
    out.append("|" + "---|" * (len(names) + 2))
    for c in allcats:
        vals = [cats[n].get(c, 0.0) for n in names]
        best = min(vals[1:]) if len(vals) > 1 else vals[0]
        out.append(f"| {c} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {vals[0] - best:+.3f} |")
    out.append("| **sum of layers** | " + " | ".join(f"{sum(o.ms for o in runs[n]):.3f}"
                                                     for n in names) + " | |")  # fmt: skip
    out += ["", f"Top {ARGS.top} per runtime (ms per run):", ""]
    tops = {n: sorted(runs[n], key=lambda o: -o.ms)[: ARGS.top] for n in names}
    out.append("| # | " + " | ".join(f"{n} | ms" for n in names) + " |")
    out.append("|" + "---|" * (1 + 2 * len(names)))
    for i in range(ARGS.top):
        cells = []
        for n in names:
            o = tops[n][i] if i < len(tops[n]) else None
            cells += [f"`{(o.label or o.kind)[:48]}`" if o else "", f"{o.ms:.3f}" if o else ""]
        out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    matched = match_layers(runs)
    diffs = sorted(matched, key=lambda m: -(m[3]["ours"].ms - min(m[3][n].ms for n in names[1:])))
    out += ["", (f"Conv/GEMM layers matched across runtimes ({len(matched)}), largest ours − best "
                 "peer first:"), "",
            "| layer (ours) | category | output elems | " + " | ".join(f"{n} ms" for n in names)
            + " | ours − best peer |", "|" + "---|" * (4 + len(names))]  # fmt: skip
    for cat, elems, _k, ops in diffs[: ARGS.top]:
        best = min(ops[n].ms for n in names[1:])
        out.append(f"| `{ops['ours'].name[:50]}` | {cat} | {elems} | "
                   + " | ".join(f"{ops[n].ms:.3f}" for n in names)
                   + f" | {ops['ours'].ms - best:+.3f} |")  # fmt: skip
    return "\n".join(out)


def main() -> int:
    torch.manual_seed(0)
    model, inputs = seeded(lambda w: FACTORY[ARGS.model, ARGS.quick](), 1.0)
    model, kw = variant_of(model, inputs, ARGS.variant)
    arrays = peers.as_arrays(inputs)
    ref = peers.flat_outputs(peers.run_torch(model, inputs))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path = peers.export_onnx(model, inputs, tmp / "model.onnx")
        art = codegen.compile(model, inputs, out_dir=tmp / "ours", **kw)
        runners = {"ours": lambda: art(*arrays),
                   **peers.peer_runners(onnx_path, arrays, ARGS.threads)}  # fmt: skip
        errs = peers.check_agreement(ref, runners, atol=1e-3)
        del runners
        runs, walls = {}, {}
        runs["ours"], walls["ours"] = ours_ops(art, inputs)
        runs["ort"], walls["ort"] = ort_ops(onnx_path, arrays, tmp)
        runs["openvino"], walls["openvino"] = openvino_ops(onnx_path, arrays)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    head = (f"`python benchmarks/profile_kernels.py --model {ARGS.model} --variant "
            f"\"{ARGS.variant}\"{' --quick' if ARGS.quick else ''} --threads {ARGS.threads}` on "
            f"{dt.date.today()}, {cpu_name()}, input {tuple(inputs[0].shape)}, "
            f"{macs(model, inputs) / 1e6:.0f} MMACs; load average {load} (shared cores: "
            f"noisy); max abs err vs torch: "
            + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
            + ". Per layer, the best of single calls (on shared cores the uncontended time): ours "
            "time_evaluator (20 calls), ORT profiler node times and OpenVINO PERF_COUNT "
            f"real_time ({ARGS.runs} runs). Wall: median of whole-model runs (contended).")
    text = head + "\n\n" + report(runs, walls)
    print(text)
    if ARGS.write:
        tag = f"profile_kernels:{ARGS.model}:{ARGS.variant}".replace(" ", "_")
        write_block(f"<!-- {tag}:start -->", f"<!-- {tag}:end -->",
                    f"### Per-kernel profile: {ARGS.model} {ARGS.variant}, {ARGS.threads} "
                    f"thread(s)\n\n{text}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
