"""A/B of one CPU schedule rule: the register tile's L2 weight-load cost (``cpu_tiles.L2_LOAD_COST``).

Compiles each model twice in one process, with the cost at 1 (every weight load counted as an L1
hit: the old choice) and at 2 (the rule), then times both artifacts per kernel
(:func:`graphprune.codegen.profile.profile_artifact`, best single call over ``--rounds``
alternating profiles of each side) and whole-model in
interleaved turns (``peers.time_turns``: best and median). Prints a table; no figure is kept.

    python benchmarks/ab_l2_tile.py --model ResNet-50 [--model MobileNetV2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", action="append", choices=["ResNet-50", "MobileNetV2", "resnet_tiny"])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--rounds", type=int, default=3, help="alternating kernel profiles per side")
p.add_argument("--repeat", type=int, default=40, help="whole-model timed calls per side")
ARGS = p.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before tvm is imported

import peers
import torch
from full_models import mobilenet, resnet, seeded
from graphprune.codegen import cpu_tiles
from graphprune.codegen.profile import profile_artifact

from graphprune import codegen, models

torch.set_num_threads(ARGS.threads)
FACTORY = {"ResNet-50": lambda: seeded(lambda w: resnet(), 1.0),
           "MobileNetV2": lambda: seeded(lambda w: mobilenet(), 1.0),
           "resnet_tiny": lambda: models.get("resnet_tiny")}  # fmt: skip


def tiles(art) -> dict[str, tuple]:
    return {n: (k["tile_rows"], k["tile_col_vectors"]) for n, k in art.manifest["kernels"].items()
            if "tile_rows" in k}  # fmt: skip


def one(name: str, tmp: Path) -> None:
    torch.manual_seed(0)
    model, inputs = FACTORY[name]()
    arrays = peers.as_arrays(inputs)
    ref = peers.flat_outputs(peers.run_torch(model, inputs))
    arts = {}
    for cost in (1, 2):
        cpu_tiles.L2_LOAD_COST = cost
        arts[cost] = codegen.compile(model, inputs, out_dir=tmp / f"{name}-{cost}")
    cpu_tiles.L2_LOAD_COST = 2
    errs = peers.check_agreement(ref, {c: (lambda a=a: a(*arrays)) for c, a in arts.items()},
                                 atol=1e-4)  # fmt: skip
    # Per kernel: the best single call over ARGS.rounds alternating profiles of each side.
    profs = {c: [] for c in arts}
    for _ in range(ARGS.rounds):
        for c, a in arts.items():
            profs[c].append(profile_artifact(a, inputs))
    times = peers.time_turns({c: (lambda a=a: a(*arrays)) for c, a in arts.items()}, ARGS.repeat)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n## {name}, {ARGS.threads} thread(s), load average {load}; max abs err vs torch "
        + ", ".join(f"w={c}: {e:.1e}" for c, e in errs.items())
    )
    print("| kernel | calls | best ms w=1 | best ms w=2 | change |\n|---|---|---|---|---|")
    best = {c: {} for c in arts}
    for c, ps in profs.items():
        for prof in ps:
            for k in prof.kernels:
                old = best[c].get(k.name, (k.calls, float("inf")))
                best[c][k.name] = (k.calls, min(old[1], k.calls * k.best_ms))
    rows = [(n, best[1][n][0], best[1][n][1], best[2][n][1])
            for n in best[1].keys() & best[2].keys()]  # fmt: skip
    rows.sort(key=lambda r: -abs(r[3] - r[2]))
    for n, calls, a, b in rows[:12]:
        print(f"| {n[:40]} | {calls} | {a:.3f} | {b:.3f} | {100 * (b / a - 1):+.1f}% |")
    s1, s2 = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| **sum of kernels (best)** | | {s1:.3f} | {s2:.3f} | {100 * (s2 / s1 - 1):+.1f}% |")
    t1, t2 = times[1], times[2]
    print(
        f"| **whole model median** | | {t1.median:.3f} | {t2.median:.3f} | "
        f"{100 * (t2.median / t1.median - 1):+.1f}% |"
    )
    print(
        f"| **whole model best** | | {t1.best:.3f} | {t2.best:.3f} | "
        f"{100 * (t2.best / t1.best - 1):+.1f}% |"
    )
    changed = {b: (tiles(arts[1]).get(b), t) for b, t in tiles(arts[2]).items()
               if tiles(arts[1]).get(b) != t}  # fmt: skip
    print("tiles changed (w=1 -> w=2):", changed or "none")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARGS.model or ["ResNet-50"]:
            one(name, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
