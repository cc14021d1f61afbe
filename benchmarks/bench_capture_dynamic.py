"""Capture time with dynamic shapes (the default since issue 14) vs a static capture.

One run, same process, same models: ``gp.capture(model, inputs)`` (batch dynamic, plus the
sequence axis of integer inputs) against ``gp.capture(model, inputs, dynamic_shapes=False)``
(every axis at its example size, the pre-issue-14 behaviour). Best of ``--repeat`` wall times
after one warm-up capture of each model. Also lists the dynamic axes each capture kept and the
axes that fell back to static. Prints a table and records it in BENCHMARKS.md between the
``bench_capture_dynamic`` markers, with the CPU, date and load average.

    .venv/bin/python benchmarks/bench_capture_dynamic.py [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from datetime import date

sys.path.insert(0, os.path.dirname(__file__))
from record import best_time, cpu_name, write_block

warnings.filterwarnings("ignore")

MODELS = ["resnet_tiny", "vit_tiny", "swin_tiny", "llama_tiny", "hf_bert_tiny", "hf_gpt2_tiny",
          "hf_llama_tiny", "resnet50"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import graphprune as gp
    from graphprune import models
    from graphprune.frontends.torch import hf

    rows = []
    for name in args.models:
        model, inputs = models.get(name) if name != "resnet50" else _resnet50()

        def cap(ds, model=model, inputs=inputs):
            with hf.capture_mode(model):
                return gp.capture(model, inputs, dynamic_shapes=ds)

        cap(False), cap(None)  # warm-up: first export of a model pays one-off costs
        t_static, _ = best_time(lambda: cap(False), args.repeat)
        t_dyn, pg = best_time(lambda: cap(None), args.repeat)
        dyn = ", ".join(f"{a.input}[{a.axis}]={a.name}[{a.min},{a.max}]" for a in pg.dynamic_axes)
        rows.append((name, t_static, t_dyn, dyn or "-", ", ".join(pg.static_axes) or "-"))
        print(f"{name:<14} static {t_static:6.2f}s  dynamic {t_dyn:6.2f}s  ({t_dyn / t_static:.2f}x)",
              flush=True)  # fmt: skip

    head = ("| model | static capture (s) | dynamic capture (s) | ratio | dynamic axes | "
            "fell back to static |\n|---|---:|---:|---:|---|---|")  # fmt: skip
    lines = [f"| {n} | {s:.2f} | {d:.2f} | {d / s:.2f}x | {dyn} | {st} |"
             for n, s, d, dyn, st in rows]  # fmt: skip
    load = os.getloadavg()
    body = (f"Capture time, default dynamic shapes vs `dynamic_shapes=False` (best of "
            f"{args.repeat}; `benchmarks/bench_capture_dynamic.py`). Machine: {cpu_name()}; "
            f"{date.today().isoformat()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            "(shared machine: other jobs ran at the same time, figures are noisy).\n\n"
            + head + "\n" + "\n".join(lines))  # fmt: skip
    print("\n" + body)
    if not args.no_write:
        write_block("<!-- bench_capture_dynamic:start -->", "<!-- bench_capture_dynamic:end -->",
                    "## Dynamic-shape capture\n\n" + body)  # fmt: skip


def _resnet50():
    from graphprune.models.resnet import resnet50

    return resnet50()


if __name__ == "__main__":
    main()
