"""Capture + dependency analysis: time and peak memory, graphprune vs Torch-Pruning.

One run, same models, same process: a ResNet-50-size CNN and a BERT-base-size encoder (random
weights). graphprune's time is split into capture (torch.export) and analysis (coupling groups);
Torch-Pruning's is ``DependencyGraph().build_dependency`` (which traces with its own forward
hooks) when ``torch-pruning`` is installed. Peak memory is Python-heap peak (tracemalloc) during
the step. Prints a table and records it in BENCHMARKS.md (section "Graph capture").

    .venv/bin/python benchmarks/bench_graph.py [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tracemalloc
import warnings
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(__file__))
from record import best_time, cpu_name, write_section  # noqa: E402

warnings.filterwarnings("ignore")


def measure(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time over ``repeat`` runs and peak traced memory (MiB) of one run."""
    best, out = best_time(fn, repeat)
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return best, peak, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)

    import graphprune as gp
    from graphprune import models
    from graphprune.passes.coupling import analyse_coupling

    try:
        import torch_pruning as tp
    except ImportError:
        tp = None

    rows = []
    for name in ("resnet50", "hf_bert_base"):
        model, inputs = models.get(name)
        t_cap, m_cap, pg = measure(lambda: gp.capture(model, inputs), args.repeat)

        t_ana, m_ana, cp = measure(lambda: analyse_coupling(pg), args.repeat)
        n_groups = len(cp.groups)
        n_prunable = sum(g.prunable for g in cp.groups)
        if tp is not None:
            ex = inputs[0] if len(inputs) == 1 else inputs
            t_tp, m_tp, dg = measure(
                lambda: tp.DependencyGraph().build_dependency(model, example_inputs=ex),
                args.repeat)  # fmt: skip
            tp_groups = len(list(dg.get_all_groups()))
        else:
            t_tp = m_tp = float("nan")
            tp_groups = "-"
        rows.append((name, f"{len(list(pg.ops()))}", f"{t_cap:.2f}", f"{t_ana:.3f}",
                     f"{t_cap + t_ana:.2f}", f"{m_cap + m_ana:.0f}", f"{n_prunable}/{n_groups}",
                     f"{t_tp:.2f}", f"{m_tp:.0f}", str(tp_groups),
                     f"{t_ana / t_tp:.3f}" if tp else "-",
                     f"{(t_cap + t_ana) / t_tp:.2f}" if tp else "-"))  # fmt: skip

    head = ("model", "ops", "gp capture s", "gp analysis s", "gp total s", "gp peak MiB",
            "gp groups (prunable/all)", "TP build s", "TP peak MiB", "TP groups",
            "analysis / TP", "total / TP")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    tpv = getattr(tp, "__version__", "not installed") if tp else "not installed"
    text = (f"Run {date.today()} on {machine}; 2 threads; best of {args.repeat}; Torch-Pruning "
            f"{tpv}.\n\n{table}\n\nTorch-Pruning traces with forward hooks and builds its graph "
            "in one step; graphprune's capture is torch.export (the dominant cost), its "
            "dependency analysis the coupling pass alone.")  # fmt: skip
    print(text)
    if not args.no_write:
        write_section("Graph capture and dependency analysis (bench_graph.py)", text)


if __name__ == "__main__":
    main()
