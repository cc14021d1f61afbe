"""INT8 sparse vs dense, one BERT-base Linear at a time: where the 1×4-block INT8 kernel pays.

One Linear ``[M, K] -> [M, N]`` (M = 128 tokens: BERT-base, batch 1, sequence 128) per shape
``K x N`` in {768x768, 768x3072, 3072x768}, weights 90% sparse (magnitude of random normal
values: unstructured, positions random), each column the layer alone built through the whole
pipeline (``gp.compile``'s stages, as ``kernels="auto"`` probes it: quantizer, kernel,
VM call), one thread:

* ``fp32 dense`` / ``fp32 CSR``: our fp32 GEMM, and the sparse rewrite's CSR kernel;
* ``int8 dense AMX`` / ``int8 dense VNNI``: W8A8 dynamic, our dense INT8 kernel with AMX tiles,
  and built for ``mcpu=icelake-server`` (AVX-512 VNNI, no AMX: a CPU without tiles);
* ``int8 BSR 1x4``: W8A8 dynamic, the 1×4-block INT8 kernel (VNNI; ``kernels="bsr"``).

Times: best of interleaved rounds (``sparse_rewrite.warm_ms``, as ``auto`` measures), ms.

    python benchmarks/bench_int8_sparse.py            # writes BENCHMARKS.md
    python benchmarks/bench_int8_sparse.py --no-write --sparsity 0.95
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--m", type=int, default=128)
p.add_argument("--sparsity", type=float, nargs="*", default=[0.9])
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--no-write", action="store_true")
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import cpu_name, md_table, write_block  # noqa: E402

START, END = "<!-- bench_int8_sparse:start -->", "<!-- bench_int8_sparse:end -->"
SHAPES = [(768, 768), (768, 3072), (3072, 768)]
COLUMNS = ["fp32 dense", "fp32 CSR", "int8 dense AMX", "int8 dense VNNI", "int8 BSR 1x4"]
VNNI = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 1}


def probes(w: np.ndarray, m: int) -> dict:
    from dataclasses import replace

    from graphprune.codegen.kernels.cpu_int8 import int8_isa
    from graphprune.codegen.quant_rewrite import rewrite_quant
    from graphprune.codegen.sparse_rewrite import compile_probe, rewrite_sparse, single_linear
    from graphprune.codegen.target import make_target
    from graphprune.ir.quant import QuantSpec, weight_scales

    host, vnni = make_target("llvm"), make_target(VNNI)
    spec = {"w": QuantSpec("w8a8_dynamic", weight_scales(w, 0), 0)}
    out, records = {}, {}

    def base():
        return replace(single_linear(w, m), param_names=["w"])

    for col, target, sparse in (("fp32 dense", host, "dense"), ("fp32 CSR", host, "csr")):
        lowered, rec = rewrite_sparse(base(), target, kernels=sparse)
        out[col] = compile_probe(lowered, None, target, 16)
    cols = [("int8 dense VNNI", vnni, "dense"), ("int8 BSR 1x4", host, "bsr")]
    if int8_isa(host) == "amx":
        cols.insert(0, ("int8 dense AMX", host, "dense"))
    for col, target, kernels in cols:
        lowered, rec = rewrite_quant(base(), target, spec, kernels=kernels)
        records[col] = rec["quant:w"]
        assert rec["quant:w"]["kernel"] == ("int8_bsr" if kernels == "bsr" else "int8"), rec
        out[col] = compile_probe(lowered, None, target, 16)
    return out, records


def main() -> int:
    from graphprune.codegen.sparse_rewrite import warm_ms

    load0, t0 = os.getloadavg(), time.time()
    rows = []
    for sparsity in ARGS.sparsity:
        for k, n in SHAPES:
            rng = np.random.default_rng(0)
            w = rng.standard_normal((n, k)).astype(np.float32)
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0
            calls, recs = probes(w, ARGS.m)
            times = {c: float("inf") for c in calls}
            for _ in range(ARGS.rounds):
                for c, (vm, args) in calls.items():
                    times[c] = min(times[c], warm_ms(vm, args, repeat=1))
            bd = recs["int8 BSR 1x4"].get("block_density")
            rows.append([f"{k}x{n}", f"{sparsity:.0%}", f"{bd:.2f}",
                         *[f"{times[c]:.3f}" if c in times else "-" for c in COLUMNS],
                         f"{times['int8 dense VNNI'] / times['int8 BSR 1x4']:.2f}",
                         f"{min(times[c] for c in times if c != 'int8 BSR 1x4') / times['int8 BSR 1x4']:.2f}"])  # fmt: skip
            print(rows[-1], flush=True)
    load1 = os.getloadavg()
    head = ["shape K×N", "sparsity", "1x4 blocks kept", *COLUMNS, "VNNI dense / BSR",
            "best other / BSR"]  # fmt: skip
    table = md_table(head, rows)
    text = (
        f"`python benchmarks/bench_int8_sparse.py` on {datetime.date.today()}, {cpu_name()}, 1 "
        f"thread, M = {ARGS.m} tokens; load average (1/5/15 min) "
        f"{', '.join(f'{v:.1f}' for v in load0)} at the start, "
        f"{', '.join(f'{v:.1f}' for v in load1)} at the end (2 cores shared with other jobs: "
        f"noisy). Each column the one-layer model through the whole pipeline (quantizer "
        f"included for int8), best of {ARGS.rounds} interleaved rounds, ms. Whole run "
        f"{time.time() - t0:.0f} s.\n\n" + table
    )
    print(text)
    if not ARGS.no_write:
        write_block(START, END, "## INT8 sparse vs dense kernels, one Linear (bench_int8_sparse)"
                    "\n\n" + text, insert=_after_int8_bert)  # fmt: skip
    return 0


def _after_int8_bert(text: str, block: str) -> str:
    mark = "<!-- bench_int8_bert:end -->"
    if mark not in text:
        return text.rstrip() + "\n\n" + block + "\n"
    i = text.index(mark) + len(mark)
    return text[:i] + "\n" + block + text[i:]


if __name__ == "__main__":
    raise SystemExit(main())
