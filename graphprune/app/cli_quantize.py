"""``graphprune quantize MODEL -o OUT``: INT8 quantization of one model (``gp.quantize``).

Output: ``.onnx`` is a QDQ ONNX model onnxruntime runs (a torch model is exported to ONNX first
and the export quantized with the same calibration); ``.pt`` is the pickled fake-quantized torch
module (evaluation in torch). Calibration: the model's example inputs plus ``--calib-batches - 1``
random batches of the same shapes (float inputs standard normal, integer inputs uniform within the
example's range); ``--calib FILE.npz`` gives one batch per file instead (one array per input
name). Options are checked before the model is loaded; errors exit 2 with one line.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

from graphprune.app.atomic import check_output, write_file_atomic
from graphprune.app.cli_options import (
    OUTPUT_NOTE,
    OneLineParser,
    onnx_example_inputs,
    parse_shape,
)
from graphprune.ir.errors import ConfigError

__all__ = ["quantize_main"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="graphprune quantize", epilog=OUTPUT_NOTE,
                      description="INT8 quantization of one model (QDQ ONNX or fake-quant torch).")
    p.add_argument("model", help="zoo name, .onnx path or pkg.module:factory")
    p.add_argument("-o", "--out", required=True, help="output model: .onnx (QDQ) or .pt (torch)")
    p.add_argument("--scheme", default="w8a8_dynamic",
                   help="w8, w8a8_dynamic (default) or w8a8_static")  # fmt: skip
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant migration strength in (0, 1), e.g. 0.5 (torch models)")
    p.add_argument("--observer", default="minmax", help="minmax, percentile or mse (static)")
    p.add_argument("--percentile", type=float, default=None,
                   help="static input range at this percentile of |x| (w8a8_static)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="layers left in float (repeatable; default: the output head)")
    p.add_argument("--calib-batches", type=int, default=4, metavar="N",
                   help="calibration batches: the example inputs and N-1 random ones (default 4)")
    p.add_argument("--calib", action="append", default=None, metavar="FILE.npz",
                   help="a calibration batch, one array per input name (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", action="append", type=parse_shape, default=[],
                   metavar="NAME=D0,D1,...", help="example shape of an ONNX input (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    return p


def _load_model(spec: str):
    """``(path, None)`` for an .onnx file, else ``(model, inputs)`` of a zoo name or factory."""
    if spec.endswith(".onnx"):
        if not os.path.isfile(spec):
            raise ConfigError(f"model file {spec} not found")
        return spec, None
    from graphprune.app.models_io import load_model

    return load_model(spec)


def _random_like(batch: list, rng: np.random.Generator) -> list:
    out = []
    for a in batch:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating):
            out.append(rng.standard_normal(a.shape).astype(a.dtype))
        elif a.dtype == np.bool_:
            out.append(a.copy())
        else:
            out.append(rng.integers(int(a.min()), int(a.max()) + 1, a.shape).astype(a.dtype))
    return out


def _calib(args, example: list, names: list[str] | None) -> list[list[np.ndarray]]:
    if args.calib:
        batches = []
        for f in args.calib:
            try:
                with np.load(f) as z:
                    arrays = dict(z)
            except (OSError, ValueError) as e:
                raise ConfigError(f"--calib {f}: not a readable .npz ({e})") from e
            if names is not None and set(arrays) != set(names):
                raise ConfigError(f"--calib {f}: has arrays {sorted(arrays)}, the model's inputs "
                                  f"are {names}")  # fmt: skip
            batches.append([arrays[n] for n in names] if names else list(arrays.values()))
        return batches
    rng = np.random.default_rng(args.seed)
    return [example] + [_random_like(example, rng) for _ in range(args.calib_batches - 1)]


def quantize_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from graphprune.api.quantize import quantize
    from graphprune.passes.quant.config import validate_quant_config

    validate_quant_config(args.scheme, args.observer, args.percentile, args.smooth,
                          calib=[0], exclude=args.exclude)  # the options, before any work
    if args.calib_batches < 1:
        raise ConfigError(f"--calib-batches {args.calib_batches}: pass 1 or more")
    if not args.out.endswith((".onnx", ".pt")):
        raise ConfigError(f"-o {args.out}: use .onnx (QDQ model) or .pt (fake-quant torch module)")
    check_output(args.out, args.force)
    model, inputs = _load_model(args.model)
    onnx_in = isinstance(model, str)
    if onnx_in:
        from graphprune.frontends.onnx.files import load_onnx

        model = load_onnx(model)[0]
        if args.out.endswith(".pt"):
            raise ConfigError(f"-o {args.out}: an ONNX model is written as .onnx")
        if args.smooth is not None:
            raise ConfigError("--smooth rewrites torch parameters; it needs a torch model")
        example = list(onnx_example_inputs(model, dict(args.shape), {}))
        names = [i.name for i in model.graph.input]
    else:
        example = [np.asarray(t) for t in inputs]
        names = None
    calib = _calib(args, example, names)
    opts = {"scheme": args.scheme, "smooth": args.smooth, "percentile": args.percentile,
            "observer": args.observer, "exclude": args.exclude}  # fmt: skip
    if not onnx_in and args.out.endswith(".onnx"):
        import torch

        # Smoothing happens in torch; the export then carries the smoothed float weights.
        res = quantize(model, tuple(inputs), calib=[tuple(torch.from_numpy(a) for a in b)
                                                    for b in calib], **opts)  # fmt: skip
        buf = io.BytesIO()
        torch.onnx.export(res.float_model(), tuple(inputs), buf, dynamo=False)
        import onnx

        opts["smooth"] = None
        res = quantize(onnx.load_from_string(buf.getvalue()), calib=calib, **opts)
    elif onnx_in:
        res = quantize(model, calib=calib, **opts)
    else:
        import torch

        res = quantize(model, tuple(inputs), calib=[tuple(torch.from_numpy(a) for a in b)
                                                    for b in calib], **opts)  # fmt: skip
    _write(res.model, args.out)
    if not args.quiet:
        print(res.report.to_text() + f"\nwrote {args.out}")
    return 0


def _write(model, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent)
        print(f"created directory {parent}", file=sys.stderr)
    if path.endswith(".onnx"):
        from graphprune.frontends.onnx.files import save_onnx

        save_onnx(model, path)
        return
    import torch

    write_file_atomic(path, lambda tmp: torch.save(model, tmp))


if __name__ == "__main__":
    sys.exit(quantize_main())
