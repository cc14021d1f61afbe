"""Sparse Linear kernels vs dense, one run, threads pinned; table into BENCHMARKS.md.

Per Linear shape ``in×out`` (weight ``[out, in]``), batch and sparsity pattern: our sparse kernel
for the pattern's format (unstructured → CSR, 2:4 → N:M, block → BSR) and our scheduled dense
Linear, both measured exactly as ``kernels="auto"`` measures them (the whole compiled Linear
through :mod:`graphprune.codegen.build`, transposes and VM call included); what ``auto``
keeps; PyTorch dense (``F.linear``), PyTorch CSR (``to_sparse_csr`` matmul), scipy CSR; and the
byte-model bound (dense weight bytes / compressed weight bytes). Times in ms, best of repeats.
After each table, the issue's goals with the measured ratios. TVM and torch use ``--threads``
threads (default: every core this process may run on), pinned to those cores; the goal rows are
measured again with each ``--goal-threads`` count (default 1).

Two cache states, applied identically to every column (``--cache``, default both), each with
its own table and goal lines:

* ``warm``: back-to-back calls; weights that fit the caches stay there between calls (a 4096²
  fp32 weight is 67 MB, but at batch 1 a 10 MB sparse one fits the 32 MiB L3);
* ``cold``: before each timed call a buffer of ``--evict-mb`` (default 4× the L3) is read by
  the calling thread (not timed), so the weights come from DRAM, as in a model whose other layers
  evict them and as the byte model assumes; each call is timed alone with ``perf_counter_ns``
  (one Python call, a few µs, included for every column), best of ``--cold-repeat``, the
  columns taking turns call by call. ``auto keeps`` in the cold table is the format ``auto``
  picks (from its warm measurement) at its cold time.

    python benchmarks/bench_kernels.py --quick    # 2 shapes, batch 1/16: ~3 min on 2 cores
    python benchmarks/bench_kernels.py            # the issue's full grid: ~15 min on 2 cores
    python benchmarks/bench_kernels.py --goals-only --threads 1 --no-write   # goal rows only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true")
p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
p.add_argument("--repeat", type=int, default=7, help="best of this many timings per cell")
p.add_argument("--goal-threads", type=int, nargs="*", default=[1],
               help="also re-measure the goal rows with these thread counts")  # fmt: skip
p.add_argument("--cache", choices=["warm", "cold", "both"], default="both",
               help="weights cache-resident between calls (warm), evicted before each (cold)")
p.add_argument("--cold-repeat", type=int, default=11, help="best of this many cold calls")
p.add_argument("--evict-mb", type=int, default=None,
               help="eviction buffer for --cache cold (default: 4x the L3 size)")
p.add_argument("--goals-only", action="store_true", help="only the rows the issue's goals name")
p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # must precede the tvm import
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])

import numpy as np  # noqa: E402
import scipy.sparse  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from record import cpu_name, write_block  # noqa: E402 - benchmarks/ is on sys.path
from graphprune.codegen.kernels import formats  # noqa: E402
from graphprune.codegen.kernels.cpu_common import simd_lanes  # noqa: E402
from graphprune.codegen.sparse_rewrite import (  # noqa: E402
    Candidate,
    compile_probe,
    single_linear,
    warm_ms,
)
from graphprune.codegen.target import make_target  # noqa: E402

torch.set_num_threads(ARGS.threads)
TARGET = make_target("llvm")
LANES = simd_lanes(TARGET)
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
START, END = "<!-- bench_kernels:start -->", "<!-- bench_kernels:end -->"
MODES = ["warm", "cold"] if ARGS.cache == "both" else [ARGS.cache]
COLUMNS = ["ours", "dense", "torch", "torch_csr", "scipy"]

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
        return w * keep.reshape(out, inp), Candidate("nm", {"nm": (2, 4)})
    if pattern.startswith("block"):
        r, c = (int(v) for v in re.match(r"block(\d+)x(\d+)", pattern).groups())
        dens = 1 - float(pattern.split()[1].rstrip("%")) / 100
        blocks = rng.random((out // r, inp // c)) < dens
        return w * np.kron(blocks, np.ones((r, c), np.float32)), Candidate(
            "bsr", {"block": (r, c)}
        )
    dens = 1 - float(pattern.rstrip("%")) / 100
    return w * (rng.random(w.shape) < dens), Candidate("csr", {})


def best_ms(fn, repeat=3, min_s=0.05):
    """Warm: best over ``repeat`` rounds of the mean of back-to-back calls (≥ ``min_s`` each)."""
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


def l3_bytes() -> int:
    """The largest cache level's size from sysfs (32 MiB where it cannot be read)."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


EVICT_BYTES = (ARGS.evict_mb or 0) * 2**20 or 4 * l3_bytes()
_EVICT: list[np.ndarray] = []


def evict() -> None:
    """Read ``EVICT_BYTES`` (written once, at allocation) on the calling thread: what the timed
    call reads next (weights, activations) comes from DRAM. A read sweep leaves the caches clean
    (writing the buffer each time would charge the timed call with writing those dirty lines
    back). One thread, numpy: sweeping on torch's OpenMP threads left them spinning into the
    timed TVM call at 2 threads (erratic cold rows); the other cores' private L2 (1 MB each
    here) is not swept."""
    if not _EVICT:
        _EVICT.append(np.ones(EVICT_BYTES // 4, dtype=np.float32))
    _EVICT[0].sum()


def cold_ms(fns: dict, repeat: int) -> dict:
    """Cold: caches evicted before each call, each call timed alone; best of ``repeat`` per
    column. The columns take turns (one call each per round), so a burst of load from other
    jobs lands on all of them rather than on one column's calls."""
    for fn in fns.values():
        fn()
    times = {c: [] for c in fns}
    for _ in range(repeat):
        for c, fn in fns.items():
            evict()
            t0 = time.perf_counter_ns()
            fn()
            times[c].append(time.perf_counter_ns() - t0)
    return {c: min(t) / 1e6 for c, t in times.items()}


def timings(fns: dict) -> dict:
    """``{mode: {column: ms}}`` for the requested cache modes, same callables in each."""
    out = {}
    for mode in MODES:
        if mode == "warm":
            out[mode] = {c: f() for c, f in fns["warm"].items()}
        else:
            out[mode] = cold_ms(fns["call"], ARGS.cold_repeat)
    return out


def our_layer(w, batch, cand):
    """Warm time (``kernels="auto"``'s own measurement) and a one-call closure of our compiled
    Linear (dense when ``cand`` is None)."""
    vm, args = compile_probe(single_linear(w, batch), cand, TARGET, LANES)
    main = vm["main"]
    return (lambda: warm_ms(vm, args, ARGS.repeat)), (lambda: main(*args))


def sparse_bytes(w, cand, batch):
    """Bytes of what our kernel reads for the weight: the arrays ``make_kernel`` binds (with
    batch 1 CSR's rows padded to whole index words)."""
    return cand.kernel(w, batch, LANES).nbytes


def row(rng, inp, out, batch, pattern) -> dict:
    w, cand = masked(rng, out, inp, pattern)
    x = rng.standard_normal((batch, inp)).astype(np.float32)
    ours_warm, ours_call = our_layer(w, batch, cand)
    dense_warm, dense_call = our_layer(w, batch, None)
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    wcsr, xT = wt.to_sparse_csr(), xt.T.contiguous()
    scsr = scipy.sparse.csr_matrix(w)
    calls = {
        "ours": ours_call, "dense": dense_call,
        "torch": lambda: torch.nn.functional.linear(xt, wt),
        "torch_csr": lambda: wcsr @ xT, "scipy": lambda: scsr @ x.T,
    }  # fmt: skip
    warm = {
        "ours": ours_warm, "dense": dense_warm,
        "torch": lambda: best_ms(calls["torch"], repeat=ARGS.repeat),
        "torch_csr": lambda: best_ms(calls["torch_csr"]), "scipy": lambda: best_ms(calls["scipy"]),
    }  # fmt: skip
    with torch.no_grad():
        times = timings({"warm": warm, "call": calls})
    bound = formats.dense_nbytes(w.shape) / sparse_bytes(w, cand, batch)
    return {"shape": (inp, out), "batch": batch, "pattern": pattern, "fmt": cand.fmt,
            **times, "bound": bound}  # fmt: skip


def settle(rows: list[dict]) -> None:
    """Our dense time does not depend on the weight's values: every row of a shape and batch
    gets the best of that group's dense measurements (one per row), which damps load spikes.
    ``auto`` decides on the warm times (as ``kernels="auto"`` measures); under ``cold`` it is
    charged the cold time of what it picked."""
    for mode in MODES:
        for r in rows:
            group = [o[mode]["dense"] for o in rows
                     if (o["shape"], o["batch"]) == (r["shape"], r["batch"])]  # fmt: skip
            r[mode]["dense"] = min(group)
    decide = "warm" if "warm" in MODES else MODES[0]
    for r in rows:
        r["auto_fmt"] = r["fmt"] if r[decide]["ours"] < r[decide]["dense"] else "dense"
        for mode in MODES:
            t = r[mode]
            t["auto"] = t["ours"] if r["auto_fmt"] != "dense" else t["dense"]
            t["speedup"] = min(t["dense"], t["torch"]) / t["ours"]


def render(r: dict, mode: str) -> str:
    t = r[mode]
    return (f"| {r['shape'][0]}×{r['shape'][1]} | {r['batch']} | {r['pattern']} | "
            f"{r['fmt']} {t['ours']:.3f} | {t['dense']:.3f} | {r['auto_fmt']} "
            f"{t['auto']:.3f} | {t['torch']:.3f} | {t['torch_csr']:.3f} | "
            f"{t['scipy']:.3f} | {t['speedup']:.2f}× | {r['bound']:.2f}× |")  # fmt: skip


def is_goal_row(r: dict) -> bool:
    return r["batch"] == 1 and (r["pattern"] == "2:4" or (
        r["pattern"] == "90%" and r["shape"] == (4096, 4096)))  # fmt: skip


def goals(rows: list[dict], threads: int, mode: str) -> str:
    """The issue's CPU goals against the measured rows (met or not, with the numbers)."""
    lines = []

    def check(name, sel, need):
        hits = [r for r in rows if sel(r)]
        if not hits:
            lines.append(f"- {name}: no row in this grid")
            return
        for r in hits:
            t = r[mode]
            ok = "met" if t["speedup"] >= need else "**not met**"
            shape = f"{r['shape'][0]}×{r['shape'][1]}"
            shown = int(t["speedup"] * 100) / 100  # truncated: 1.4996 must not read as 1.50
            best = min(t["dense"], t["torch"])
            lines.append(f"- {name} ({shape}, {threads} thread(s), {mode} cache): {shown:.2f}× "
                         f"over the best dense ({t['ours']:.3f} vs {best:.3f} ms; goal ≥ "
                         f"{need}×, byte bound {r['bound']:.2f}×): {ok}")  # fmt: skip

    check("90% unstructured, batch 1",
          lambda r: r["shape"] == (4096, 4096) and r["batch"] == 1 and r["pattern"] == "90%", 4.0)
    check("2:4 fp32, batch 1", lambda r: r["batch"] == 1 and r["pattern"] == "2:4", 1.5)
    if threads != ARGS.threads:
        return "\n".join(lines)
    slower = [r for r in rows if r[mode]["auto"] > r[mode]["dense"]]
    how = ("it keeps the faster of the two timings it takes, so this holds up to the noise "
           "between its measurement and a later run" if mode == "warm" else
           "`auto` decides on warm timings; here it is charged the cold time of its pick")
    lines.append(f"- `auto` never slower than our dense ({mode} cache): {len(rows) - len(slower)} "
                 f"of {len(rows)} rows ({how})")  # fmt: skip
    if mode != "warm":
        missed = [r for r in rows
                  if r["auto_fmt"] == "dense" and r[mode]["ours"] < r[mode]["dense"]]  # fmt: skip
        named = "; ".join(f"{r['shape'][0]}×{r['shape'][1]} b{r['batch']} {r['pattern']} "
                          f"({r['fmt']} {r[mode]['ours']:.3f} vs dense "
                          f"{r[mode]['dense']:.3f})" for r in missed)  # fmt: skip
        lines.append(f"- rows where `auto`'s warm decision (dense) left a faster sparse kernel "
                     f"unused in the {mode} cache: {len(missed)}"
                     + (f": {named}" if missed else ""))  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} ({TARGET.attrs['mcpu']})"


def write(body: str) -> None:
    write_block(START, END, f"## Sparse kernels (bench_kernels)\n\n{body.strip()}", PATH)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average (1/5/15 min) " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def set_threads(n: int) -> None:
    """Resize TVM's and torch's thread pools in this process (TVM_NUM_THREADS is read once)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, n)
    torch.set_num_threads(n)


def goal_rows_at(threads: int, rng, shape) -> list[dict]:
    """The goal rows of ``shape`` again, with ``threads`` threads (our sparse, our dense and
    torch dense each re-measured)."""
    set_threads(threads)
    cells = [(*shape, batch, pattern) for batch in BATCHES for pattern in PATTERNS]
    again = [row(rng, *c) for c in cells
             if is_goal_row({"shape": c[:2], "batch": c[2], "pattern": c[3]})]  # fmt: skip
    set_threads(ARGS.threads)
    return again


def worker(index: int) -> int:
    """One shape's rows (and its goal rows at each ``--goal-threads`` count) as JSON lines on
    stdout. Each shape runs in its own process: one process for the whole grid grew past 12 GB
    and was OOM-killed, though one row alone peaks at 2.2 GB (the growth across rows was not
    traced; TVM's pooled VM allocator, which keeps what it served, is the likely holder)."""
    rng = np.random.default_rng(index)
    shape = SHAPES[index]
    for batch in BATCHES:
        for pattern in PATTERNS:
            cell = {"shape": shape, "batch": batch, "pattern": pattern}
            if ARGS.goals_only and not is_goal_row(cell):
                continue
            r = row(rng, *shape, batch, pattern)
            print(" ".join(f"{m}: ours {r[m]['ours']:.3f} dense {r[m]['dense']:.3f}"
                           for m in MODES), cell, file=sys.stderr, flush=True)  # fmt: skip
            print(json.dumps({**r, "threads": ARGS.threads}), flush=True)
    for n in sorted(set(ARGS.goal_threads) - {ARGS.threads}):
        for r in goal_rows_at(n, rng, shape):
            print(json.dumps({**r, "threads": n}), flush=True)
    return 0


def run_shape(index: int) -> list[dict]:
    args = [sys.executable, os.path.abspath(__file__), "--worker", str(index), "--threads",
            str(ARGS.threads), "--repeat", str(ARGS.repeat), "--cache", ARGS.cache,
            "--cold-repeat", str(ARGS.cold_repeat), "--evict-mb", str(EVICT_BYTES // 2**20),
            "--goal-threads", *map(str, ARGS.goal_threads)]  # fmt: skip
    args += ["--quick"] * ARGS.quick + ["--goals-only"] * ARGS.goals_only
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=True)
    out = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            r["shape"] = tuple(r["shape"])
            out.append(r)
    return out


HEADER = ("| Linear in×out | batch | pattern | ours (format) | our dense | auto keeps | "
          "torch dense | torch CSR | scipy CSR | ours vs best dense | byte bound |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
TITLES = {"warm": "Warm cache (back-to-back calls)",
          "cold": "Cold cache (caches evicted before each call)"}  # fmt: skip


def tables(measured: list[dict]) -> str:
    """Per cache mode: the main table and its goals, then the goal rows at each
    ``--goal-threads`` count with theirs."""
    rows = [r for r in measured if r["threads"] == ARGS.threads]
    settle(rows)
    again = {n: [r for r in measured if r["threads"] == n]
             for n in sorted(set(ARGS.goal_threads) - {ARGS.threads})}  # fmt: skip
    for group in again.values():
        settle(group)
    out = []
    for mode in MODES:
        text = (f"### {TITLES[mode]}, {ARGS.threads} thread(s)\n\n{HEADER}\n"
                + "\n".join(render(r, mode) for r in rows)
                + f"\n\nGoals (issue #6), {mode} cache:\n\n" + goals(rows, ARGS.threads, mode))
        for n, group in again.items():
            text += (f"\n\nThe goal rows again with {n} thread(s), {mode} cache:\n\n{HEADER}\n"
                     + "\n".join(render(r, mode) for r in group) + "\n\n"
                     + goals(group, n, mode))  # fmt: skip
        out.append(text)
    return "\n\n".join(out)


def main() -> int:
    if ARGS.worker is not None:
        return worker(ARGS.worker)
    t0, up_before = time.time(), uptime()
    print(up_before, flush=True)
    measured = [r for i in range(len(SHAPES)) for r in run_shape(i)]
    body_tables = tables(measured)
    up_after = uptime()
    print(body_tables, "\n" + up_after, flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flags = "".join(f" {a}" for a in sys.argv[1:])
    body = (
        f"`python benchmarks/bench_kernels.py{flags}` on {date} ({(time.time() - t0) / 60:.0f} "
        f"min), {machine()}, {ARGS.threads} thread(s) pinned for TVM and torch (scipy is "
        "single-threaded).\n\n"
        f"- `uptime` before: `{up_before}`\n- `uptime` after: `{up_after}`\n\n"
        "A load average near or above the core count means other jobs shared the cores: single "
        "rows can then be off by tens of percent (both directions; the memory-bound batch-1 "
        "rows suffer most).\n\n"
        f"Times in ms. **Warm**: best of {ARGS.repeat} rounds of back-to-back calls, weights "
        "cache-resident where they fit. **Cold**: before each call a "
        f"{EVICT_BYTES // 2**20} MiB buffer is read by the calling thread (not timed; the other core's private L2 is not swept), "
        f"each call timed alone, best of {ARGS.cold_repeat} (the columns take turns call by "
        "call): weights stream from DRAM, as "
        "between the layers of a model and as the byte model assumes. Both apply to every "
        "column. `ours` and `our dense` are the whole compiled "
        "Linear as `kernels=\"auto\"` measures it (transposes and VM call included; `our dense` "
        "is measured in every row and each row shows the best of its shape and batch); `auto "
        "keeps` is what `auto` picks from its warm measurement, at that table's time; `ours vs "
        "best dense` divides the faster of our dense and torch dense by ours. Byte bound = dense "
        "fp32 weight bytes / bytes of the arrays our kernel reads (CSR: int16 column indices "
        "where K ≤ 32768, 6 bytes per nonzero; at batch 1 each row is padded to a multiple of "
        "4 nonzeros). Each Linear shape runs in its own process.\n\n"
        + body_tables + "\n"
    )
    if not ARGS.no_write:
        write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
