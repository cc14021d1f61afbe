"""``graphprune compile MODEL.onnx --target llvm -o OUT_DIR``: compile an ONNX file to an artifact.

:func:`compile_main` is the sub-command's body; the ``graphprune`` console script dispatches to
it. Progress goes to stderr (one line per stage with elapsed time), the summary table to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from graphprune.app.atomic import check_output, missing_parent
from graphprune.app.cli_options import (
    OUTPUT_NOTE,
    OneLineParser,
    onnx_example_inputs,
    parse_shape,
    user_error,
)
from graphprune.ir.errors import ConfigError, GraphPruneError

__all__ = ["compile_main"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="graphprune compile", epilog=OUTPUT_NOTE,
                      description="Compile an ONNX model to a TVM artifact.")  # fmt: skip
    p.add_argument("model", help="path of the .onnx file")
    p.add_argument("-o", "--out", required=True, help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    p.add_argument("--schedule", default="ours", choices=["ours", "stock", "dlight"])
    p.add_argument("--shape", action="append", type=parse_shape, default=[],
                   metavar="NAME=D0,D1,...",
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
    """Run ``graphprune compile``; returns the process exit code (0 ok, 2 user error, one line
    on stderr). The output is checked before anything is built: an existing artifact needs
    ``--force``, an existing file or a non-artifact folder is never replaced, and a directory
    that cannot be written is refused; a missing parent directory is created (once the build
    succeeded: a failed compile leaves nothing) and reported."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        check_output(args.out, args.force, directory=True)
        _check_readable(args.model)
        model, example = args.model, None
        if args.shape:
            from graphprune.frontends.onnx.files import load_onnx

            model = load_onnx(args.model)[0]
            shapes = dict(args.shape)
            example = list(onnx_example_inputs(model, shapes).values())
            missing = [n for n in _input_names(model) if n not in shapes]
            if missing:
                raise ConfigError(f"with --shape, give every input's shape (missing {missing})")
        created = missing_parent(os.path.join(args.out, "manifest.json"))
        from graphprune.codegen.compiler import compile as compile_model

        art = compile_model(model, example, target=args.target, out_dir=args.out,
                            schedule=args.schedule, progress=progress)  # fmt: skip
    except GraphPruneError as e:
        return user_error(str(e))
    if created is not None:  # by the artifact writer, only once the build succeeded
        progress(f"created directory {created}")
    progress("done")
    print(_summary(art, time.perf_counter() - start))
    return 0


def _check_readable(path: str) -> None:
    """Refuse, before any work, a model that is not a readable ONNX file (its external data is
    not read here)."""
    import onnx

    if not os.path.isfile(path):
        raise ConfigError(f"model file {path} not found")
    try:
        onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
        raise ConfigError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from e


def _input_names(proto) -> list[str]:
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


if __name__ == "__main__":
    sys.exit(compile_main())
