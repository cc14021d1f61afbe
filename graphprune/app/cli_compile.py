"""``graphprune compile MODEL.onnx --target llvm -o OUT_DIR``: compile an ONNX file to an artifact.

:func:`compile_main` is the sub-command's body; the ``graphprune`` console script dispatches to
it. Progress goes to stderr (one line per stage with elapsed time), the summary table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from graphprune.ir.errors import GraphPruneError

__all__ = ["compile_main"]


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.rpartition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=D0,D1,..., got {text!r}")
    try:
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: dims must be integers") from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphprune compile", description="Compile an ONNX model to a TVM artifact."
    )
    p.add_argument("model", help="path of the .onnx file")
    p.add_argument("-o", "--out", required=True, help="artifact directory to write")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    p.add_argument("--schedule", default="ours", choices=["ours", "stock", "dlight"])
    p.add_argument("--shape", action="append", type=_parse_shape, default=[],
                   help="static shape for a dynamic input, NAME=D0,D1,... (repeatable)")  # fmt: skip
    return p


def _summary(art, seconds: float) -> str:
    man = art.manifest
    rows = [("artifact", str(art.path)), ("target", man["target"]["str"])]
    rows += [(f"input {s['name']}", f"{s['shape']} {s['dtype']}") for s in man["inputs"]]
    rows += [(f"output {s['name']}", f"{s['shape']} {s['dtype']}") for s in man["outputs"]]
    rules = Counter(k["rule"] for k in man["kernels"].values())
    rows.append(("kernels", ", ".join(f"{n} {r}" for r, n in rules.most_common())))
    for name in man["files"]:
        rows.append((name, f"{(art.path / name).stat().st_size / 1e6:.2f} MB"))
    rows.append(("build time", f"{seconds:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def compile_main(argv: list[str] | None = None) -> int:
    """Run ``graphprune compile``; returns the process exit code (0 ok, 2 error)."""
    args = _parser().parse_args(argv)
    from graphprune.codegen.compiler import compile as compile_model

    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    model = args.model
    try:
        if args.shape:
            import numpy as np
            import onnx

            proto = onnx.load(model)
            shapes = dict(args.shape)
            inits = {t.name for t in proto.graph.initializer}
            names = [i.name for i in proto.graph.input if i.name not in inits]
            unknown = set(shapes) - set(names)
            if unknown:
                print(f"error: --shape names {sorted(unknown)} are not inputs {names}",
                      file=sys.stderr)  # fmt: skip
                return 2
            example = [np.zeros(shapes[n], "float32") if n in shapes else None for n in names]
            if any(e is None for e in example):
                missing = [n for n, e in zip(names, example) if e is None]
                print(f"error: with --shape, give every input's shape (missing {missing})",
                      file=sys.stderr)  # fmt: skip
                return 2
            art = compile_model(proto, example, target=args.target, out_dir=args.out,
                                schedule=args.schedule, progress=progress)  # fmt: skip
        else:
            art = compile_model(model, None, target=args.target, out_dir=args.out,
                                schedule=args.schedule, progress=progress)  # fmt: skip
    except GraphPruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress("done")
    print(_summary(art, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(compile_main())
