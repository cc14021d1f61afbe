"""A/B of the parallel grain of our CPU rules (``cpu_loops.MIN_PARALLEL_WORK`` and
``MIN_PARALLEL_ELEMENTS``): small kernels serial (the rule) vs every kernel parallel (before).

Compiles each model twice in one process (grain 0 = every loop parallel, as before; then the
rule's thresholds), checks both against PyTorch, then times both whole-model in interleaved
turns (``peers.time_turns``: median and best) and per kernel (best single call over ``--rounds``
alternating profiles). Run it with ``--threads 2``: at 1 thread a parallel loop runs inline.
Prints a table; no figure is kept.

    python benchmarks/ab_parallel_grain.py --model MobileNetV2 --model ResNet-50 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", action="append", choices=["ResNet-50", "MobileNetV2"])
p.add_argument("--full", action="store_true", help="full-size models (default: quick sizes)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rounds", type=int, default=3, help="alternating kernel profiles per side")
p.add_argument("--repeat", type=int, default=60, help="whole-model timed calls per side")
p.add_argument("--try-work", type=int, default=0, metavar="MACS",
               help="time the rule against this MIN_PARALLEL_WORK (elements: an eighth of it) "
                    "instead of against every loop parallel")  # fmt: skip
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before tvm is imported

import peers
import torch
from full_models import mobilenet, resnet, seeded
from graphprune.codegen import cpu_loops, cpu_rules
from graphprune.codegen.profile import profile_artifact

from graphprune import codegen

torch.set_num_threads(ARGS.threads)
FACTORY = {
    ("ResNet-50", False): lambda: resnet(0.25, (1, 1, 1, 1), 64),
    ("MobileNetV2", False): lambda: mobilenet(0.5, 96),
    ("ResNet-50", True): lambda: resnet(),
    ("MobileNetV2", True): lambda: mobilenet(),
}
RULE = (cpu_loops.MIN_PARALLEL_WORK, cpu_loops.MIN_PARALLEL_ELEMENTS)
SIDES = {f"grain {ARGS.try_work}" if ARGS.try_work else "all parallel":
         (ARGS.try_work, ARGS.try_work // 8), "rule": RULE}  # fmt: skip


def set_grain(work: int, elements: int) -> None:
    cpu_rules.MIN_PARALLEL_WORK = cpu_loops.MIN_PARALLEL_WORK = work
    cpu_loops.MIN_PARALLEL_ELEMENTS = elements


def one(name: str, tmp: Path) -> None:
    torch.manual_seed(0)
    model, inputs = seeded(lambda w: FACTORY[name, ARGS.full](), 1.0)
    arrays = peers.as_arrays(inputs)
    ref = peers.flat_outputs(peers.run_torch(model, inputs))
    arts = {}
    for side, grain in SIDES.items():
        set_grain(*grain)
        arts[side] = codegen.compile(model, inputs, out_dir=tmp / f"{name}-{grain[0]}")
    set_grain(*RULE)
    runners = {s: (lambda a=a: a(*arrays)) for s, a in arts.items()}
    errs = peers.check_agreement(ref, runners, atol=1e-4)
    profs = {s: [] for s in arts}
    for _ in range(ARGS.rounds):
        for s, a in arts.items():
            profs[s].append(profile_artifact(a, inputs))
    times = peers.time_turns(runners, ARGS.repeat)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    a, b = SIDES
    print(f"\n## {name}{' (full size)' if ARGS.full else ' (quick sizes)'}, {ARGS.threads} "
          f"thread(s), grain {RULE[0]} MACs / {RULE[1]} elements, load average {load}; max abs "
          "err vs torch " + ", ".join(f"{s}: {e:.1e}" for s, e in errs.items()))  # fmt: skip
    print(f"| kernel | calls | best ms {a} | best ms {b} | change |\n|---|---|---|---|---|")
    best = {s: {} for s in arts}
    for s, ps in profs.items():
        for prof in ps:
            for k in prof.kernels:
                old = best[s].get(k.name, (k.calls, float("inf")))
                best[s][k.name] = (k.calls, min(old[1], k.calls * k.best_ms))
    rows = [(n, best[a][n][0], best[a][n][1], best[b][n][1])
            for n in best[a].keys() & best[b].keys()]  # fmt: skip
    rows.sort(key=lambda r: -abs(r[3] - r[2]))
    for n, calls, x, y in rows[:12]:
        print(f"| {n[:44]} | {calls} | {x:.4f} | {y:.4f} | {100 * (y / x - 1):+.1f}% |")
    s1, s2 = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| **sum of kernels (best)** | | {s1:.3f} | {s2:.3f} | {100 * (s2 / s1 - 1):+.1f}% |")
    for stat in ("median", "best"):
        x, y = getattr(times[a], stat), getattr(times[b], stat)
        print(f"| **whole model {stat}** | | {x:.3f} | {y:.3f} | {100 * (y / x - 1):+.1f}% |")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARGS.model or ["MobileNetV2", "ResNet-50"]:
            one(name, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
