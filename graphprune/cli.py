"""The ``graphprune`` command line (also ``python -m graphprune``).

Exit codes: 0 success, 2 user error (a :class:`GraphPruneError`: bad model, file, option),
1 internal failure (a bug: please report it with the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from graphprune.errors import GraphPruneError


def _load_model(spec: str) -> tuple[Any, Any]:
    """A zoo name (``resnet_tiny``) or the path of a ``.onnx`` file."""
    if spec.endswith(".onnx"):
        return spec, None
    from graphprune import models

    if spec not in models.ZOO and spec not in ("resnet50", "hf_bert_base"):
        raise GraphPruneError(
            f"unknown model {spec!r}: give a .onnx path or one of {', '.join(sorted(models.ZOO))}"
        )
    return models.get(spec)


def cmd_demo(args: argparse.Namespace) -> int:
    """Capture a zoo model, show its groups and what pruning ``--ratio`` of each would remove."""
    import torch

    import graphprune as gp
    from graphprune.oracle import run_oracle
    from graphprune.passes.importance import lowest, magnitude_scores

    model, inputs = _load_model(args.model)
    t0 = time.perf_counter()
    pg = gp.capture(model, inputs)
    groups = pg.groups()
    t1 = time.perf_counter()
    print(gp.explain(pg))
    print(f"\ncapture + dependency analysis: {t1 - t0:.2f} s ({pg.capture_method})\n")
    removal = {}
    print(f"What pruning {args.ratio:.0%} of each prunable group (lowest L2 magnitude) removes:")
    for g in groups:
        if g.prunable:
            removal[g.id] = lowest(magnitude_scores(pg, g), args.ratio)
            print(f"  group {g.id:>3}: {len(removal[g.id]):>4} of {g.size:<4} "
                  f"({g.granularity} per index)  {g.describe()}")  # fmt: skip
    small = gp.remove_channels(pg, removal)
    n0 = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    n1 = sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        ref, out = model(*inputs), small(*inputs)
    shapes = lambda o: [tuple(t.shape) for t in (o if isinstance(o, (tuple, list)) else [o])]  # noqa
    print(f"\nparameters: {n0:,} -> {n1:,} ({n1 / n0:.1%}); output shapes {shapes(ref)} -> "
          f"{shapes(out)}")  # fmt: skip
    check = run_oracle(pg, removal)
    print(f"oracle (same channels made dead, then removed): max |diff| = {check.max_abs_diff:.2e}")
    check.assert_close(atol=1e-4, rtol=1e-4)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import graphprune as gp

    model, inputs = _load_model(args.model)
    pg = gp.capture(model, inputs)
    print(gp.explain(pg, limit=args.limit))
    if args.json:
        _write(args.json, pg.to_json())
    if args.dot:
        _write(args.dot, _to_dot(pg))
    return 0


def _to_dot(pg: Any) -> str:
    lines = ["digraph G {", "  rankdir=TB; node [fontsize=10];"]
    for n in pg.nx.nodes:
        if pg.is_op(n):
            lines.append(f'  "{n}" [shape=box, label="{n}\\n{pg.op(n).kind}"];')
        else:
            v = pg.value(n)
            shape = "ellipse" if v.role != "param" else "note"
            lines.append(f'  "{n}" [shape={shape}, label="{n}\\n{list(v.shape or ())}"];')
    lines += [f'  "{u}" -> "{v}";' for u, v in pg.nx.edges()]
    return "\n".join(lines + ["}"])


def _write(path: str, text: str) -> None:
    import os
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="capture an embedded model, show groups and a pruning plan")
    d.add_argument("--model", default="resnet_tiny", help="zoo name or .onnx path")
    d.add_argument("--ratio", type=float, default=0.5)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("inspect", help="graph summary and coupled groups")
    i.add_argument("model", help="zoo name or .onnx path")
    i.add_argument("--json", help="write the graph as JSON")
    i.add_argument("--dot", help="write the graph as Graphviz dot")
    i.add_argument("--limit", type=int, default=None, help="show at most N groups")
    i.set_defaults(fn=cmd_inspect)
    sub.add_parser("compile", help="compile a model to a TVM artifact (graphprune compile -h)",
                   add_help=False)  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile"]:
        from graphprune.codegen.cli import compile_main

        return compile_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except GraphPruneError as e:
        print(f"graphprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
