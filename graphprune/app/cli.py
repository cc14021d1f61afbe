"""The ``graphprune`` command line (also ``python -m graphprune``).

Sub-commands: ``demo``, ``inspect``, ``prune``, ``sparsify``, ``quantize``, ``compile``,
``run RECIPE``, ``bench ARTIFACT``, ``report ARTIFACT``. Progress goes to stderr as
``[  1.2s] step`` lines (``--quiet`` silences it), results to stdout (``--json`` makes them one
JSON object).

Exit codes: 0 success, 2 user error (a :class:`GraphPruneError`: bad model, file, option, an
output path that cannot be written; reported as one ``graphprune: error: ...`` line on stderr,
never a traceback), 1 internal failure (a bug: please report it with the traceback), 130
interrupted (Ctrl-C or SIGTERM; a ``run`` interrupted midway leaves no partial artifact).

Outputs (``-o``, ``--json``/``--dot`` files) are checked before any work: an existing one is
replaced only with ``--force`` (an artifact directory only by an artifact, a file only by a
file), a path that cannot be written is refused, and missing parent directories are created
and reported on stderr (``created directory ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from graphprune.app.atomic import check_output, make_parent, write_file_atomic
from graphprune.app.cli_options import (
    DYNAMIC_HELP,
    OUTPUT_NOTE,
    SHAPE_HELP,
    OneLineParser,
    onnx_example_inputs,
    parse_range,
    parse_shape,
    user_error,
)
from graphprune.frontends import kind_of
from graphprune.ir.errors import ConfigError, GraphPruneError
from graphprune.passes.coupling import build_coupling


def _load_model(spec: str) -> tuple[Any, Any]:
    """A zoo name (``resnet_tiny``), the path of a ``.onnx`` file (returned as the path) or a
    python factory ``pkg.module:function`` / ``file.py:function``."""
    if spec.endswith(".onnx"):
        if not os.path.isfile(spec):
            raise GraphPruneError(f"model file {spec} not found")
        return spec, None
    from graphprune.app.models_io import load_model  # zoo name or pkg.module:factory

    return load_model(spec)


def cmd_demo(args: argparse.Namespace) -> int:
    """Capture a zoo model, show its groups and what pruning ``--ratio`` of each would remove."""
    import torch

    from graphprune.api.graph import capture, explain
    from graphprune.api.remove import remove_channels
    from graphprune.passes.prune.criteria import CriterionContext, l2, lowest
    from graphprune.testing.oracle import run_oracle

    model, inputs = _load_model(args.model)
    t0 = time.perf_counter()
    pg = capture(model, inputs)
    groups = build_coupling(pg).groups
    t1 = time.perf_counter()
    print(explain(pg))
    print(f"\ncapture + dependency analysis: {t1 - t0:.2f} s ({pg.capture_method})\n")
    removal = {}
    ctx = CriterionContext(pg)
    print(f"What pruning {args.ratio:.0%} of each prunable group (lowest L2 magnitude) removes:")
    for g in groups:
        if g.prunable:
            removal[g.id] = lowest(l2(ctx, g), args.ratio)
            print(f"  group {g.id:>3}: {len(removal[g.id]):>4} of {g.size:<4} "
                  f"({g.granularity} per index)  {g.describe()}")  # fmt: skip
    small = remove_channels(pg, removal)
    n0 = sum(p.numel() for p in model.parameters()) if kind_of(model) == "torch" else 0
    n1 = sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        ref, out = model(*inputs), small(*inputs)
    shapes = lambda o: [tuple(t.shape) for t in (o if isinstance(o, (tuple, list)) else [o])]
    print(f"\nparameters: {n0:,} -> {n1:,} ({n1 / n0:.1%}); output shapes {shapes(ref)} -> "
          f"{shapes(out)}")  # fmt: skip
    check = run_oracle(pg, removal)
    print(f"oracle (same channels made dead, then removed): max |diff| = {check.max_abs_diff:.2e}")
    check.assert_close(atol=1e-4, rtol=1e-4)
    return 0


def _onnx_inputs(args: argparse.Namespace, model: Any, inputs: Any) -> tuple[Any, dict | None]:
    """``(example inputs, dynamic_shapes)`` from ``--shape`` / ``--dynamic`` (ONNX only)."""
    shapes, ranges = dict(getattr(args, "shape", None) or []), dict(
        getattr(args, "dynamic", None) or [])  # fmt: skip
    if not shapes and not ranges:
        return inputs, None
    if kind_of(model) != "onnx":
        raise ConfigError(f"--shape and --dynamic are for ONNX models; {args.model} brings its own "
                          "example inputs")  # fmt: skip
    from graphprune.frontends.onnx.files import load_onnx

    proto = load_onnx(model)[0] if isinstance(model, str) else model
    return (onnx_example_inputs(proto, shapes, ranges) if shapes else None), (ranges or None)


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphprune.api.graph import capture, explain

    out = _Out(args)
    for path in (args.json, args.dot):
        if path:
            check_output(path, args.force)
    model, inputs = _load_model(args.model)
    inputs, dynamic = _onnx_inputs(args, model, inputs)
    pg = capture(model, inputs, dynamic_shapes=dynamic)
    print(explain(pg, limit=args.limit))
    if args.json:
        _write(args.json, pg.to_json(), out)
    if args.dot:
        _write(args.dot, _to_dot(pg), out)
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


def _made_parent(path: str, out: _Out) -> None:
    created = make_parent(path)
    if created is not None:
        out.progress(f"created directory {created}")


def _write(path: str, text: str, out: _Out) -> None:
    from graphprune.app.atomic import write_text_atomic

    _made_parent(path, out)
    write_text_atomic(os.path.abspath(path), text)
    print(f"wrote {path}")


class _Out:
    """Where a command's output goes: progress lines on stderr, results on stdout or as JSON."""

    def __init__(self, args: argparse.Namespace):
        self.quiet = getattr(args, "quiet", False)
        self.json = getattr(args, "json_out", False)
        self.t0 = time.perf_counter()

    def progress(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def result(self, text: str, data: dict) -> None:
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif not self.quiet:
            print(text)


_SUFFIXES = (".onnx", ".pt2", ".pt")


def _check_model_out(path: str, force: bool) -> None:
    """Before any work: ``-o`` has a suffix we write and can be written (see :func:`check_output`)."""
    if not path.endswith(_SUFFIXES):
        raise ConfigError(f"-o {path}: use .onnx, .pt2 (torch.export) or .pt (pickle)")
    check_output(path, force)


def _save_model(model: Any, path: str, inputs: Any, out: _Out) -> None:
    """Write a pruned / sparsified model: ``.onnx`` (ONNX in stays ONNX, torch is exported),
    ``.pt2`` (``torch.export.save``) or ``.pt`` (the pickled module), atomically."""
    onnx_in = kind_of(model) == "onnx"
    if onnx_in and not path.endswith(".onnx"):
        raise ConfigError(f"-o {path}: an ONNX model is written as .onnx")
    _made_parent(path, out)

    if onnx_in:  # large models go with their external data
        from graphprune.frontends.onnx.files import save_onnx

        save_onnx(model, path)
        out.progress(f"wrote {path}")
        return

    def write(tmp: str) -> None:
        import torch

        if path.endswith(".onnx"):
            torch.onnx.export(model, tuple(inputs), tmp, dynamo=False)
        elif path.endswith(".pt2"):
            torch.export.save(torch.export.export(model, tuple(inputs)), tmp)
        else:
            torch.save(model, tmp)

    write_file_atomic(path, write)
    out.progress(f"wrote {path}")


def cmd_prune(args: argparse.Namespace) -> int:
    """Structured pruning of one model; ONNX in gives ONNX out."""
    from graphprune.api.options import check_prune_options
    from graphprune.api.structured import prune
    from graphprune.passes.prune.channels import PruneConfig

    out = _Out(args)
    options = {"ratio": args.ratio, "criterion": args.criterion, "scope": args.scope,
               "target_macs": args.target_macs, "target_params": args.target_params,
               "round_to": args.round_to, "min_keep": args.min_keep}  # fmt: skip
    check_prune_options(**options)  # options first, before any work (as gp.prune would)
    PruneConfig(**options).validate()
    _check_model_out(args.out, args.force)
    model, inputs = _load_model(args.model)
    inputs, dynamic = _onnx_inputs(args, model, inputs)
    out.progress(f"pruning {args.model} (criterion={args.criterion}, scope={args.scope})")
    res = prune(model, inputs, ratio=args.ratio, criterion=args.criterion, scope=args.scope,
                   target_macs=args.target_macs, target_params=args.target_params,
                   round_to=args.round_to, heads=args.heads, ignore=args.ignore,
                   min_keep=args.min_keep, dynamic_shapes=dynamic)  # fmt: skip
    _save_model(res.model, args.out, inputs, out)
    r = res.report
    out.result(r.to_text() + f"\nwrote {args.out}", {
        "out": args.out, "form": r.form, "params_before": r.params_before,
        "params_after": r.params_after, "macs_before": r.macs_before, "macs_after": r.macs_after,
        "groups_pruned": len(r.removed), "notes": r.notes})  # fmt: skip
    return 0


def cmd_sparsify(args: argparse.Namespace) -> int:
    """Weight sparsity masks of one model; ONNX in gives ONNX out (magnitude / random)."""
    from graphprune.api.sparsify import sparsify
    from graphprune.passes.sparsity.config import validate_config

    out = _Out(args)
    validate_config(sparsity=args.sparsity, pattern=args.pattern, method=args.method,
                    example_inputs=())  # the options alone, before any work
    _check_model_out(args.out, args.force)
    model, inputs = _load_model(args.model)
    inputs, dynamic = _onnx_inputs(args, model, inputs)
    if isinstance(model, str):  # an .onnx path: sparsify works on the ModelProto
        from graphprune.frontends.onnx.files import load_onnx

        model = load_onnx(model)[0]
    out.progress(f"sparsifying {args.model} (pattern={args.pattern}, method={args.method})")
    res = sparsify(model, inputs, sparsity=args.sparsity, pattern=args.pattern,
                      method=args.method, dynamic_shapes=dynamic)  # fmt: skip
    _save_model(res.model, args.out, inputs, out)
    rep = res.report
    rows = [(ls.name, 1 - ls.kept / max(ls.total, 1)) for ls in rep.layers]
    text = "\n".join([f"sparsity {rep.pattern} ({rep.method}): {len(rows)} layers"]
                     + [f"  {n}: {s:.1%}" for n, s in rows]
                     + [f"  left dense: {k}: {v}" for k, v in rep.excluded.items()]
                     + [f"wrote {args.out}"])  # fmt: skip
    out.result(text, {"out": args.out, "pattern": str(rep.pattern), "method": rep.method,
                      "layers": dict(rows), "excluded": dict(rep.excluded)})  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe: prune → sparsify → compile → verify → report, into one artifact."""
    from graphprune.app.pipeline import run

    out = _Out(args)
    dest = args.out
    if dest is None:
        from graphprune.app.recipe import load_recipe

        dest = load_recipe(args.recipe)["out"]
    if dest is not None:  # else the pipeline says out: is missing
        check_output(dest, args.force, directory=True)
        _made_parent(dest, out)
    res = run(args.recipe, out=args.out, force=args.force, progress=out.progress)
    t = res.summary["totals"]
    v = res.summary["verify"]
    worst = max((r.get("max_abs_diff", 0) for r in v["vs_compiled_model"]), default=0.0)
    lines = [f"artifact: {res.out_dir}"]
    if res.report_html:
        lines += [f"report:   {res.report_html}", f"          {res.report_md}"]
    if t.get("params_before") is not None:
        lines.append(f"params {t['params_before']:,} -> {t['params_after']:,}; "
                     f"MACs {t['macs_before']:,} -> {t['macs_after']:,}")  # fmt: skip
    if t.get("sparsified_fraction") is not None:
        lines.append(f"sparsified: {t['sparsified_fraction']:.1%} of the targeted weights")
    lines.append(f"verify: max |artifact - model| = {worst:.2e} (atol {v['atol']:g}) "
                 f"{'ok' if v['passed'] else 'FAILED'}")  # fmt: skip
    lines.append(f"replay: graphprune run {res.out_dir / 'recipe.json'} -o OTHER_DIR")
    out.result("\n".join(lines), res.to_json())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency of the artifact vs the source model (and the pruned ONNX), in one process."""
    from graphprune.app.bench import bench_artifact

    out = _Out(args)
    res = bench_artifact(args.artifact, runs=args.runs, warmup=args.warmup,
                         progress=out.progress, save=not args.no_save)  # fmt: skip
    width = max(len(r["name"]) for r in res["rows"])
    base = res["rows"][0]["median_ms"]
    text = "\n".join([f"{'model':<{width}}  median ms    p90 ms  speedup"] + [
        f"{r['name']:<{width}}  {r['median_ms']:9.3f} {r['p90_ms']:9.3f}  "
        f"{base / r['median_ms']:6.2f}x" for r in res["rows"]])  # fmt: skip
    out.result(text, res)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from graphprune.app.report import write_report

    out = _Out(args)
    if args.out:
        _made_parent(os.path.join(args.out, "report.html"), out)
    out.progress(f"rendering the report of {args.artifact}")
    html, md = write_report(args.artifact, args.out)
    out.result(f"report: {html}\n        {md}", {"html": str(html), "markdown": str(md)})
    return 0


def _onnx_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", action="append", type=parse_shape, default=[],
                        metavar="NAME=D0,D1,...", help=SHAPE_HELP)  # fmt: skip
    parser.add_argument("--dynamic", action="append", type=parse_range, default=[],
                        metavar="DIM=MIN,MAX", help=DYNAMIC_HELP)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="graphprune", description=__doc__.splitlines()[0], epilog=OUTPUT_NOTE)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    common.add_argument("--json", dest="json_out", action="store_true",
                        help="print the result as one JSON object on stdout")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    d = sub.add_parser("demo", help="capture an embedded model, show groups and a pruning plan")
    d.add_argument("--model", default="resnet_tiny", help="zoo name or .onnx path")
    d.add_argument("--ratio", type=float, default=0.5)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("inspect", help="graph summary and coupled groups", epilog=OUTPUT_NOTE)
    i.add_argument("model", help="zoo name or .onnx path")
    i.add_argument("--json", help="write the graph as JSON")
    i.add_argument("--dot", help="write the graph as Graphviz dot")
    i.add_argument("--limit", type=int, default=None, help="show at most N groups")
    i.add_argument("--force", action="store_true", help="overwrite the --json/--dot files")
    _onnx_shape_args(i)
    i.set_defaults(fn=cmd_inspect)
    model_help = "zoo name, .onnx path or pkg.module:factory"
    pr = sub.add_parser("prune", parents=[common], help="structured pruning of one model",
                        epilog=OUTPUT_NOTE)  # fmt: skip
    pr.add_argument("model", help=model_help)
    pr.add_argument("-o", "--out", required=True, help="output model: .onnx, .pt2 or .pt")
    pr.add_argument("--ratio", type=float, default=0.5)
    pr.add_argument("--criterion", default="l2")
    pr.add_argument("--scope", default="local", choices=["local", "global"])
    pr.add_argument("--target-macs", type=float, default=None)
    pr.add_argument("--target-params", type=float, default=None)
    pr.add_argument("--round-to", type=int, default=None)
    pr.add_argument("--min-keep", type=float, default=0.1,
                    help="never shrink a group below this fraction (default 0.1)")
    pr.add_argument("--ignore", action="append", default=None, metavar="GLOB",
                    help="layers never to prune (parameter/module name glob; repeatable)")
    pr.add_argument("--no-heads", dest="heads", action="store_false")
    pr.add_argument("--force", action="store_true", help="overwrite the output file")
    _onnx_shape_args(pr)
    pr.set_defaults(fn=cmd_prune)
    sp = sub.add_parser("sparsify", parents=[common], help="weight sparsity of one model",
                        epilog=OUTPUT_NOTE)  # fmt: skip
    sp.add_argument("model", help=model_help)
    sp.add_argument("-o", "--out", required=True, help="output model: .onnx, .pt2 or .pt")
    sp.add_argument("--sparsity", type=float, default=None)
    sp.add_argument("--pattern", default="unstructured", help="unstructured, N:M or block:RxC")
    sp.add_argument("--method", default="magnitude")
    sp.add_argument("--force", action="store_true", help="overwrite the output file")
    _onnx_shape_args(sp)
    sp.set_defaults(fn=cmd_sparsify)
    sub.add_parser("compile", help="compile a model to a TVM artifact (graphprune compile -h)",
                   add_help=False)  # fmt: skip
    sub.add_parser("quantize", help="INT8 quantization of one model (graphprune quantize -h)",
                   add_help=False)  # fmt: skip
    r = sub.add_parser("run", parents=[common], help="run a recipe (YAML/JSON) end to end",
                       epilog=OUTPUT_NOTE)  # fmt: skip
    r.add_argument("recipe", help="recipe file, e.g. examples/demo.yaml or ARTIFACT/recipe.json")
    r.add_argument("-o", "--out", default=None, help="artifact directory (overrides out:)")
    r.add_argument("--force", action="store_true", help="replace an existing artifact")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", parents=[common], help="latency: artifact vs source model")
    b.add_argument("artifact", help="artifact directory written by graphprune run")
    b.add_argument("--runs", type=int, default=30)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--no-save", action="store_true", help="do not write ARTIFACT/bench.json")
    b.set_defaults(fn=cmd_bench)
    rp = sub.add_parser("report", parents=[common], help="HTML + markdown report of an artifact",
                        epilog=OUTPUT_NOTE)  # fmt: skip
    rp.add_argument("artifact", help="artifact directory written by graphprune run")
    rp.add_argument("-o", "--out", default=None, help="folder for the report (default: artifact)")
    rp.set_defaults(fn=cmd_report)
    return p


_signalled: list[int] = []


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so temporary files are removed
    _signalled.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile"]:
        from graphprune.app.cli_compile import compile_main

        return guarded(lambda: compile_main(argv[1:]))
    if argv[:1] == ["quantize"]:
        from graphprune.app.cli_quantize import quantize_main

        return guarded(lambda: quantize_main(argv[1:]))
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.fn(args))


def guarded(fn: Callable[[], int | None]) -> int:
    """Run a command: graphprune's errors and the operating system's refusals of a named file
    (permission, missing folder, not a directory) are user errors, exit 2 with one line; Ctrl-C
    and SIGTERM exit 130; anything else is a bug and keeps its traceback."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    _signalled.clear()
    try:
        return int(fn() or 0)
    except GraphPruneError as e:
        # A signal raised inside TVM's FFI comes back wrapped in a build error: still a stop.
        return _interrupted() if _signalled else user_error(str(e))
    except OSError as e:
        if e.filename is None or _signalled:
            raise
        return user_error(f"{e.filename}: {e.strerror or e}")
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted() -> int:
    print("graphprune: interrupted; nothing was left half-written", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
