"""Sparse Linear kernels vs dense, one run, threads pinned; table into BENCHMARKS.md.

Per Linear shape ``in×out`` (weight ``[out, in]``), batch and sparsity pattern: our sparse kernel
for the pattern's format (unstructured → CSR, 2:4 → N:M, block → BSR) and our scheduled dense
Linear, both measured exactly as ``kernels="auto"`` measures them (the whole compiled Linear
through :mod:`graphprune.codegen.pipeline`, transposes and VM call included); what ``auto``
keeps; PyTorch dense (``F.linear``), PyTorch CSR (``to_sparse_csr`` matmul), scipy CSR; and the
byte-model bound (dense weight bytes / compressed weight bytes). Times in ms, best of repeats.

    python benchmarks/bench_kernels.py --quick    # 2 shapes, batch 1/16, a few minutes
    python benchmarks/bench_kernels.py            # the issue's full grid (long on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # must precede the tvm import

import numpy as np  # noqa: E402
import scipy.sparse  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from graphprune.codegen.kernels import formats  # noqa: E402
from graphprune.codegen.sparse_rewrite import _Candidate, _time_linear  # noqa: E402
from graphprune.codegen.target import make_target  # noqa: E402

torch.set_num_threads(ARGS.threads)
TARGET = make_target("llvm")
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
START, END = "<!-- bench_kernels:start -->", "<!-- bench_kernels:end -->"

SHAPES = [(768, 3072), (3072, 768), (4096, 4096), (4096, 11008)]
BATCHES = [1, 16, 128]
PATTERNS = ["50%", "70%", "90%", "95%", "2:4", "block4x4 90%", "block16x1 90%"]
if ARGS.quick:
    SHAPES, BATCHES = [(768, 3072), (4096, 4096)], [1, 16]
    PATTERNS = ["70%", "90%", "2:4", "block4x4 90%", "block16x1 90%"]


def masked(rng, out, inp, pattern):
    w = rng.standard_normal((out, inp)).astype(np.float32)
    if pattern == "2:4":
        keep = np.argsort(rng.random((out, inp // 4, 4)), axis=2) < 2
        return w * keep.reshape(out, inp), _Candidate("nm", {"nm": (2, 4)})
    if pattern.startswith("block"):
        r, c = (int(v) for v in re.match(r"block(\d+)x(\d+)", pattern).groups())
        dens = 1 - float(pattern.split()[1].rstrip("%")) / 100
        blocks = rng.random((out // r, inp // c)) < dens
        return w * np.kron(blocks, np.ones((r, c), np.float32)), _Candidate(
            "bsr", {"block": (r, c)}
        )
    dens = 1 - float(pattern.rstrip("%")) / 100
    return w * (rng.random(w.shape) < dens), _Candidate("csr", {})


def best_ms(fn, repeat=5, min_s=0.05):
    fn()
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_s:
                break
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def sparse_bytes(w, cand, batch):
    if cand.fmt == "csr":
        return formats.compress_csr(w, "int32" if batch == 1 else None).nbytes()
    if cand.fmt == "bsr":
        return formats.compress_bsr(w, cand.options["block"]).nbytes()
    return formats.compress_nm(w, *cand.options["nm"]).nbytes()


def row(rng, inp, out, batch, pattern):
    w, cand = masked(rng, out, inp, pattern)
    x = rng.standard_normal((batch, inp)).astype(np.float32)
    ours = _time_linear(w, batch, cand, TARGET, 16)
    dense = _time_linear(w, batch, None, TARGET, 16)
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    with torch.no_grad():
        t_dense = best_ms(lambda: torch.nn.functional.linear(xt, wt))
        wcsr = wt.to_sparse_csr()
        xT = xt.T.contiguous()
        t_csr = best_ms(lambda: wcsr @ xT)
    scsr = scipy.sparse.csr_matrix(w)
    t_scipy = best_ms(lambda: scsr @ x.T)
    bound = formats.dense_nbytes(w.shape) / sparse_bytes(w, cand, batch)
    auto = cand.fmt if ours < dense else "dense"
    best_dense = min(dense, t_dense)
    return (f"| {inp}×{out} | {batch} | {pattern} | {cand.fmt} {ours:.3f} | {dense:.3f} | "
            f"{auto} {min(ours, dense):.3f} | {t_dense:.3f} | {t_csr:.3f} | {t_scipy:.3f} | "
            f"{best_dense / ours:.2f}× | {bound:.2f}× |")  # fmt: skip


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} ({TARGET.attrs['mcpu']})"


def write(body: str) -> None:
    text = open(PATH).read() if os.path.exists(PATH) else "# Benchmarks\n"
    block = f"{START}\n## Sparse kernels (bench_kernels)\n\n{body.strip()}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(PATH), prefix=".bench-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, PATH)


def main() -> int:
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    header = ("| Linear in×out | batch | pattern | ours (format) | our dense | auto keeps | "
              "torch dense | torch CSR | scipy CSR | ours vs best dense | byte bound |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    print(header, flush=True)
    rows = []
    for inp, out in SHAPES:
        for batch in BATCHES:
            for pattern in PATTERNS:
                rows.append(row(rng, inp, out, batch, pattern))
                print(rows[-1], flush=True)
    load_after = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f"`python benchmarks/bench_kernels.py{' --quick' if ARGS.quick else ''}` on {date}, "
        f"{machine()}, {ARGS.threads} thread(s) for TVM and torch (scipy is single-threaded). "
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after: the 2 "
        "cores are shared with other jobs, so single rows can be off by tens of percent.\n\n"
        "Times in ms, best of 5. `ours` and `our dense` are the whole compiled Linear as "
        "`kernels=\"auto\"` measures it (transposes and VM call included); `auto keeps` is the "
        "faster of the two. Byte bound = dense fp32 weight bytes / compressed bytes (CSR: int32 "
        "indices at batch 1 where the gather wants them, int16 otherwise).\n\n"
        f"{header}\n" + "\n".join(rows)
    )
    if not ARGS.no_write:
        write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
