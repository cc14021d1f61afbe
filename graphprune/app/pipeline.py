"""``gp.run(recipe)``: the whole compile step as one call.

capture → prune → sparsify → (fine-tune callback) → compile → verify → report, driven by a
:mod:`graphprune.app.recipe`. Each step is the public API (``gp.prune``, ``gp.sparsify``,
``gp.compile``); this module only chains them, checks the result and writes the artifact.

The artifact directory (``out``) is assembled in a temporary sibling ``.NAME.tmp-*`` and renamed
into place only when every step succeeded, so an interrupted or failed run leaves no partial
artifact (a ``kill -9`` can leave the hidden temporary folder, never a half-written ``out``).
An existing ``out`` is refused unless ``force=True``, and even then only an earlier artifact (or
an empty folder) is replaced. Besides codegen's ``model.so``, ``weights.npz`` and
``manifest.json`` the artifact holds::

    recipe.json    # the resolved recipe: `graphprune run OUT/recipe.json -o OTHER` replays it
    summary.json   # prune / sparsify / per-layer / verify numbers (deterministic)
    run.json       # wall times of each step (differs between runs by nature)
    model.onnx     # the pruned ONNX model, when the source was ONNX
    report.html, report.md

Determinism: the seed in the recipe seeds torch and numpy, example and calibration inputs are
generated from it, so a replay gives byte-identical ``model.so``, ``weights.npz``,
``recipe.json``, ``summary.json`` (and ``model.onnx``). ``manifest.json`` differs only in its
``created`` timestamp (and so its ``self_sha256``); ``run.json`` and the reports carry wall times.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.ir.errors import ArtifactError, ConfigError, VerificationError
from graphprune.app.recipe import Recipe, load_recipe

__all__ = ["DETERMINISTIC_FILES", "PipelineResult", "load_model", "run"]

#: files a replay of the same recipe reproduces byte for byte
DETERMINISTIC_FILES = ("model.so", "weights.npz", "recipe.json", "summary.json", "model.onnx")


@dataclass
class PipelineResult:
    """What :func:`run` produced. ``model`` is the pruned/sparsified source-form model (torch
    module or ONNX ``ModelProto``), ``artifact`` the loaded compiled artifact."""

    out_dir: Path
    artifact: Any
    model: Any
    recipe: dict
    summary: dict
    timings: dict = field(default_factory=dict)
    report_html: Path | None = None
    report_md: Path | None = None

    def to_json(self) -> dict:
        return {
            "artifact": str(self.out_dir),
            "report_html": str(self.report_html) if self.report_html else None,
            "report_md": str(self.report_md) if self.report_md else None,
            "totals": self.summary["totals"],
            "verify": self.summary["verify"],
            "timings": self.timings,
        }


# --- model and inputs ---------------------------------------------------------------------------


def load_model(spec: str, base_dir: Path | None = None) -> tuple[Any, Any]:
    """``(model, example_inputs or None)`` from a zoo name, an ``.onnx`` path (returned as an
    ``onnx.ModelProto``) or ``"pkg.module:factory"`` / ``"path/file.py:factory"``."""
    if spec.endswith(".onnx"):
        import onnx

        if not Path(spec).is_file():
            raise ConfigError(f"model: ONNX file {spec} not found")
        try:
            return onnx.load(spec), None
        except Exception as e:
            raise ConfigError(f"model: {spec} is not a readable ONNX file: {e}") from e
    from graphprune import models

    if spec in models.ZOO or spec in ("resnet50", "hf_bert_base"):
        return models.get(spec)
    if ":" not in spec:
        what = "an existing file that is not .onnx" if Path(spec).exists() else "not a zoo name"
        raise ConfigError(
            f"model: {spec!r} is {what}: give a .onnx path, one of {', '.join(sorted(models.ZOO))}"
            f", or a python factory 'pkg.module:function' returning (model, inputs) or a model"
        )
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise ConfigError(f"model: python file {target} not found")
            mod_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            extra = [str(base_dir)] if base_dir is not None else []
            sys.path[:0] = extra
            try:
                mod = importlib.import_module(target)
            finally:
                del sys.path[: len(extra)]
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"model: {spec!r} is neither a .onnx file nor importable: {e}") from e
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"model: importing {target!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"model: {target!r} has no callable {attr!r}")
    try:
        made = fn()
    except Exception as e:
        raise ConfigError(f"model: {spec}() raised {type(e).__name__}: {e}") from e
    if isinstance(made, tuple) and len(made) == 2:
        model, inputs = made
        return model, tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    return made, None


def _make_inputs(specs: dict, seed: int, torch_form: bool) -> tuple:
    rng = np.random.default_rng(seed)
    out = []
    for s in specs.values():
        if s["dtype"].startswith("float"):
            a = rng.standard_normal(s["shape"]).astype(s["dtype"])
        elif s["dtype"] == "bool":
            a = rng.integers(0, 2, s["shape"]).astype(bool)
        else:
            a = rng.integers(int(s["low"]), int(s["high"]), s["shape"]).astype(s["dtype"])
        out.append(a)
    if torch_form:
        import torch

        return tuple(torch.from_numpy(a) for a in out)
    return tuple(out)


def _onnx_input_specs(proto) -> dict:
    inits = {t.name for t in proto.graph.initializer}
    from onnx import helper

    specs = {}
    for i in proto.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None or d <= 0 for d in dims):
            raise ConfigError(f"model input {i.name!r} has dynamic shape {dims}: give its static "
                              f"shape in the recipe's inputs: {{{i.name}: [...]}}")  # fmt: skip
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        specs[i.name] = {"shape": dims, "dtype": dtype, "low": 0, "high": 100}
    return specs


def _calib_batches(recipe: Recipe, specs: dict, inputs: tuple, torch_form: bool) -> list | None:
    cal = recipe["calib"]
    if cal is None:
        return None
    n = cal["batches"]
    if cal["source"] == "random":
        return [_make_inputs(specs, recipe["seed"] + 1 + i, torch_form) for i in range(n)]
    path = Path(cal["source"])
    if not path.is_file():
        raise ConfigError(f"calib.source: {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ConfigError(f"calib.source: {path} is not a readable .npz: {e}") from e
    names = list(specs)
    missing = [k for k in names if k not in arrays]
    if missing and len(arrays) == len(names):
        arrays = dict(zip(names, arrays.values()))  # positional when the names differ
    elif missing:
        raise ConfigError(f"calib.source: {path} lacks arrays {missing} (has {sorted(arrays)})")
    batch = specs[names[0]]["shape"][0]
    total = min(a.shape[0] for a in arrays.values())
    if total < batch:
        raise ConfigError(f"calib.source: {path} has {total} samples, fewer than one batch "
                          f"({batch})")  # fmt: skip
    out = []
    for i in range(min(n, total // batch)):
        arrs = [arrays[k][i * batch : (i + 1) * batch].astype(specs[k]["dtype"]) for k in names]
        if torch_form:
            import torch

            arrs = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrs]
        out.append(tuple(arrs))
    return out


# --- running models ------------------------------------------------------------------------------


def _flatten(out) -> list[np.ndarray]:
    if out is None:
        return []
    if hasattr(out, "detach"):
        return [out.detach().cpu().numpy()]
    if isinstance(out, np.ndarray):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values") and hasattr(out, "keys"):
        out = list(out.values())
    res = []
    for o in out:
        res.extend(_flatten(o))
    return res


def run_source(model, inputs) -> list[np.ndarray]:
    """Outputs of a torch module or an ONNX model (onnxruntime) as numpy arrays."""
    if type(model).__name__ == "ModelProto":
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {n: np.asarray(x) for n, x in zip(names, inputs)}
        return list(sess.run(None, feed))
    import torch

    with torch.no_grad():
        return _flatten(model(*inputs))


def _compare(got: list, ref: list) -> list[dict]:
    rows = []
    for i, (a, b) in enumerate(zip(got, ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        row = {"output": i, "shape": list(b.shape)}
        if a.shape != b.shape:
            row["error"] = f"shape {list(a.shape)} != {list(b.shape)}"
        else:
            d = np.abs(a - b)
            row["max_abs_diff"] = float(d.max()) if d.size else 0.0
            row["rel_l2"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            if b.ndim == 2 and b.shape[1] > 1:
                row["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
        rows.append(row)
    return rows


# --- the pipeline --------------------------------------------------------------------------------


class _Steps:
    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress or (lambda msg: None)
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def step(self, name: str, msg: str):
        steps = self

        class _Ctx:
            def __enter__(self):
                steps.progress(msg)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                steps.timings[name] = round(time.perf_counter() - self.t, 3)

        return _Ctx()


def _check_out(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ConfigError(f"output directory {out} exists: choose another out or pass --force "
                          f"(force=True) to replace it")  # fmt: skip
    if not out.is_dir() or ((not (out / "manifest.json").exists()) and any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not a graphprune artifact; refusing to replace it "
                          f"even with --force (remove it yourself or choose another out)")  # fmt: skip


def run(
    recipe: Any,
    *,
    out: str | os.PathLike | None = None,
    force: bool = False,
    fine_tune: Callable | None = None,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run a recipe end to end and write its artifact atomically.

    Parameters
    ----------
    recipe : path, dict or Recipe
        See :mod:`graphprune.app.recipe`.
    out : path, optional
        Overrides the recipe's ``out``.
    force : bool
        Replace an existing artifact at ``out`` (a non-artifact folder is never replaced).
    fine_tune : callable ``(model, example_inputs, calib_batches) -> model or None``, optional
        Torch only; runs after sparsify, before compile. Sparsity masks are re-applied to what
        it returns, so training cannot revive pruned weights.
    progress : callable(str), optional
        Called with a short message at each step (the CLI prints them to stderr).

    Returns
    -------
    PipelineResult

    Examples
    --------
    >>> import graphprune as gp
    >>> res = gp.run({"model": "resnet_tiny", "prune": {"ratio": 0.3},
    ...               "out": "/tmp/gp_demo"}, force=True)          # doctest: +SKIP
    >>> res.summary["verify"]["passed"]                            # doctest: +SKIP
    True
    """
    rec = load_recipe(recipe)
    data = rec.to_dict()
    if out is not None:
        data["out"] = os.path.abspath(out)
    if data["out"] is None:
        raise ConfigError(f"{rec.source}: out: missing; give the artifact directory in the recipe "
                          f"or with -o/--out")  # fmt: skip
    rec = Recipe(data, rec.source, rec.base_dir)
    out_dir = Path(data["out"])
    _check_out(out_dir, force)
    steps = _Steps(progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        result = _run_into(rec, tmp / "artifact", steps, fine_tune)
        steps.progress(f"moving artifact into place: {out_dir}")
        _swap_into_place(tmp / "artifact", out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    result.out_dir = out_dir
    for attr in ("report_html", "report_md"):
        p = getattr(result, attr)
        if p is not None:
            setattr(result, attr, out_dir / p.name)
    from graphprune.runtime import load

    result.artifact = load(out_dir)
    return result


def _swap_into_place(new: Path, out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        _check_out(out_dir, force)  # re-check: it may have appeared while we were working
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "previous")
        try:
            os.rename(new, out_dir)
        except BaseException:
            os.rename(old / "previous", out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out_dir)


def _seed(seed: int) -> None:
    np.random.seed(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def _run_into(rec: Recipe, art_dir: Path, steps: _Steps, fine_tune) -> PipelineResult:
    import graphprune as gp

    data, seed = rec.to_dict(), rec["seed"]
    with steps.step("load", f"loading model {data['model']}"):
        source, given_inputs = load_model(data["model"], rec.base_dir)
        is_onnx = type(source).__name__ == "ModelProto"
        torch_form = not is_onnx
        if torch_form:
            import torch

            if not isinstance(source, torch.nn.Module):
                raise ConfigError(f"model: {data['model']} gave a {type(source).__name__}, not a "
                                  f"torch.nn.Module or (module, inputs)")  # fmt: skip
            source.eval()
        given_specs = None
        if given_inputs is not None:
            names = _input_names(source, len(given_inputs))
            given_specs = {
                n: {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                    "low": 0, "high": 100}
                for n, x in zip(names, given_inputs)
            }  # fmt: skip
        # the factory's own (seeded) inputs win when the recipe asks for the same shapes, so a
        # replay of a resolved recipe runs on exactly the inputs of the first run
        if given_specs is not None and (data["inputs"] is None or _same_specs(data["inputs"],
                                                                               given_specs)):
            specs, inputs = data["inputs"] or given_specs, tuple(given_inputs)
        elif data["inputs"] is not None:
            specs = data["inputs"]
            inputs = _make_inputs(specs, seed, torch_form)
        elif is_onnx:
            specs = _onnx_input_specs(source)
            inputs = _make_inputs(specs, seed, False)
        else:
            raise ConfigError(f"model: {data['model']} returned no example inputs: give their "
                              f"shapes in the recipe's inputs: {{name: [...]}}")  # fmt: skip
        data["inputs"] = specs  # resolved: a replay builds the same inputs
        calib = _calib_batches(rec, specs, inputs, torch_form)
    _seed(seed)
    summary: dict[str, Any] = {"model": data["model"], "frontend": "onnx" if is_onnx else "torch"}
    model, graph = source, None
    prune_report = None
    if data["prune"] is not None:
        p = dict(data["prune"])
        with steps.step("prune", f"pruning (criterion={p['criterion']}, scope={p['scope']})"):
            drop, unit = p.pop("drop_blocks"), p.pop("depth_unit")
            if drop:
                res = gp.prune(model, inputs if torch_form else None, criterion=p["criterion"],
                               calib=calib, drop_blocks=drop, depth_unit=unit, seed=seed)  # fmt: skip
            else:
                res = gp.prune(model, inputs if torch_form else None, calib=calib, seed=seed,
                               **p)  # fmt: skip
            model, graph, prune_report = res.model, res.graph, res.report
    sp_report, masks = None, {}
    if data["sparsify"] is not None:
        s = data["sparsify"]
        with steps.step("sparsify", f"sparsifying ({s['pattern']}, {s['method']})"):
            kw = dict(sparsity=s["sparsity"], pattern=s["pattern"], method=s["method"],
                      scope=s["scope"], min_keep=s["min_keep"], exclude=s["exclude"], seed=seed)  # fmt: skip
            if torch_form:
                sres = gp.sparsify(model, inputs, calib=calib, **kw)
            else:
                sres = gp.sparsify(model, None, **kw)
            model, sp_report, masks = sres.model, sres.report, sres.masks
    if fine_tune is not None:
        if not torch_form:
            raise ConfigError("fine_tune is for torch models; an ONNX model cannot be trained here")
        with steps.step("fine_tune", "fine-tuning (user callback)"):
            tuned = fine_tune(model, inputs, calib)
            model = model if tuned is None else tuned
            _reapply_masks(model, masks)
    comp = data["compile"]
    with steps.step("compile", f"compiling for {comp['target']} (schedule {comp['schedule']})"):
        kwargs = _compile_kwargs(comp)
        art = gp.compile(model, inputs, target=comp["target"], out_dir=art_dir,
                         schedule=comp["schedule"], progress=lambda m: steps.progress("  " + m),
                         **kwargs)  # fmt: skip
    manifest = art.manifest
    ver = data["verify"]
    with steps.step("verify", "verifying the artifact against the model it was compiled from"):
        got = _flatten_art(art(*inputs))
        ref = run_source(model, inputs)
        verify = {"atol": ver["atol"], "rtol": ver["rtol"], "enabled": ver["enabled"]}
        if len(got) != len(ref):
            raise VerificationError(f"the artifact returns {len(got)} outputs, the model "
                                    f"{len(ref)}")  # fmt: skip
        verify["vs_compiled_model"] = _compare(got, ref)
        verify["vs_source_model"] = _compare(got, run_source(source, inputs))
        fails = [
            r for r, a, b in zip(verify["vs_compiled_model"], got, ref)
            if "error" in r or not np.allclose(a, b, atol=ver["atol"], rtol=ver["rtol"])
        ]  # fmt: skip
        verify["passed"] = not fails
        if fails and ver["enabled"]:
            worst = max(fails, key=lambda r: r.get("max_abs_diff", float("inf")))
            raise VerificationError(
                f"verify: artifact output {worst['output']} differs from the pruned model by "
                f"max |diff| {worst.get('max_abs_diff', worst.get('error'))} > atol {ver['atol']} "
                f"(rtol {ver['rtol']}); no artifact was written. Raise verify.atol or report a "
                f"codegen bug"
            )
    summary.update(_summarise(source, model, inputs, prune_report, sp_report, graph, manifest,
                              verify, is_onnx))  # fmt: skip
    if is_onnx:
        import onnx

        onnx.save(model, str(art_dir / "model.onnx"))
    (art_dir / "recipe.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (art_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    html = md = None
    result = PipelineResult(art_dir, art, model, data, summary, steps.timings)
    run_info = {"timings_s": steps.timings}
    (art_dir / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
    if data["report"]:
        with steps.step("report", "writing report.html and report.md"):
            from graphprune.app.report import write_report

            html, md = write_report(art_dir)
        (art_dir / "run.json").write_text(json.dumps({"timings_s": steps.timings}, indent=2,
                                                     sort_keys=True) + "\n")  # fmt: skip
    result.report_html, result.report_md = html, md
    return result


def _flatten_art(y) -> list:
    return list(y) if isinstance(y, tuple) else [y]


def _same_specs(a: dict, b: dict) -> bool:
    strip = lambda d: [(s["shape"], s["dtype"]) for s in d.values()]
    return strip(a) == strip(b)


def _input_names(model, n: int) -> list[str]:
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        names = [p.name for p in params[:n]]
    except (TypeError, ValueError):
        names = []
    return names if len(names) == n else [f"input{i}" for i in range(n)]


def _compile_kwargs(comp: dict) -> dict:
    import inspect

    from graphprune.codegen.compiler import compile as codegen_compile

    if "kernels" in inspect.signature(codegen_compile).parameters:
        return {"kernels": comp["kernels"]}
    if comp["kernels"] != "auto":
        raise ConfigError(f"compile.kernels {comp['kernels']!r}: this graphprune's compile has no "
                          f"kernel choice yet; use kernels: auto")  # fmt: skip
    return {}


def _reapply_masks(model, masks: dict) -> None:
    if not masks:
        return
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            if name in params and params[name].shape == m.shape:
                params[name].mul_(m.to(params[name].dtype))


def _summarise(source, model, inputs, prune_report, sp_report, graph, manifest, verify,
               is_onnx) -> dict:  # fmt: skip
    """Per-layer rows and totals, JSON-ready (read by :mod:`graphprune.app.report`)."""
    layers: dict[str, dict] = {}
    if prune_report is not None:
        for r in prune_report.layers:
            if len(r.before) < 2:
                continue
            layers[r.param] = {
                "param": r.param, "shape_before": list(r.before), "shape_after": list(r.after),
                "channels_before": r.before[0], "channels_after": r.after[0],
                "params_before": int(np.prod(r.before)), "params_after": int(np.prod(r.after)),
            }  # fmt: skip
        op_param = {}
        if graph is not None:
            for o, _, _ in prune_report.macs_per_op:
                for v in graph.op_inputs(o):
                    if v is not None and not graph.is_op(v) and graph.value(v).param:
                        if len(graph.value(v).shape or ()) >= 2:
                            op_param[o] = graph.value(v).param
                            break
        for o, b, a in prune_report.macs_per_op:
            name = op_param.get(o)
            if name in layers:
                layers[name]["macs_before"] = layers[name].get("macs_before", 0) + int(b)
                layers[name]["macs_after"] = layers[name].get("macs_after", 0) + int(a)
    if sp_report is not None:
        for ls in sp_report.layers:
            row = layers.setdefault(ls.name, {"param": ls.name, "shape_after": list(ls.shape),
                                              "params_after": int(np.prod(ls.shape))})  # fmt: skip
            row["sparsity"] = round(1 - ls.kept / max(ls.total, 1), 6)
            row["pattern"] = str(sp_report.pattern)
        for name, why in sp_report.excluded.items():
            key = name if name in layers else f"{name}.weight"
            if key in layers:
                layers[key]["sparsity_note"] = why
    totals = {
        "params_before": prune_report.params_before if prune_report else None,
        "params_after": prune_report.params_after if prune_report else None,
        "macs_before": prune_report.macs_before if prune_report else None,
        "macs_after": prune_report.macs_after if prune_report else None,
    }
    if sp_report is not None:
        kept = sum(ls.kept for ls in sp_report.layers)
        total = sum(ls.total for ls in sp_report.layers)
        totals["sparsified_fraction"] = round(1 - kept / max(total, 1), 6)
    return {
        "prune": None if prune_report is None else {
            "criterion": prune_report.criterion, "scope": prune_report.scope,
            "ratio_used": prune_report.ratio, "form": prune_report.form,
            "groups_pruned": len(prune_report.removed), "groups_frozen": len(prune_report.frozen),
            "notes": list(prune_report.notes),
        },
        "sparsify": None if sp_report is None else {
            "method": sp_report.method, "pattern": str(sp_report.pattern),
            "excluded": dict(sp_report.excluded), "notes": list(sp_report.notes),
        },
        "layers": list(layers.values()),
        "kernels": manifest.get("kernels", {}),
        "totals": totals,
        "verify": verify,
    }  # fmt: skip


# --- latency -------------------------------------------------------------------------------------


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return {"median_ms": float(np.median(ts)), "p90_ms": float(ts[int(0.9 * (len(ts) - 1))]),
            "runs": runs}  # fmt: skip


def bench_artifact(artifact: str | os.PathLike, runs: int = 30, warmup: int = 5,
                   progress: Callable[[str], None] | None = None, save: bool = True) -> dict:  # fmt: skip
    """Median latency of the source model (torch eager or onnxruntime), the pruned ONNX model
    (ONNX sources) and the compiled artifact, measured in this one process on the same inputs.
    Written to ``ARTIFACT/bench.json`` (read by the report) unless ``save=False``."""
    from graphprune.runtime import load

    if runs < 1 or warmup < 0:
        raise ConfigError("bench: runs must be >= 1 and warmup >= 0")
    step = progress or (lambda m: None)
    art_dir = Path(artifact)
    art = load(art_dir)
    recipe_path = art_dir / "recipe.json"
    if not recipe_path.is_file():
        raise ArtifactError(f"{art_dir} has no recipe.json: bench needs an artifact written by "
                            f"`graphprune run` (it names the source model)")  # fmt: skip
    rec = json.loads(recipe_path.read_text())
    step(f"loading the source model {rec['model']}")
    source, _ = load_model(rec["model"])
    torch_form = type(source).__name__ != "ModelProto"
    inputs = _make_inputs(rec["inputs"], rec.get("seed", 0), torch_form)
    rows = []
    candidates: list[tuple[str, Callable[[], Any]]] = []
    if torch_form:
        import torch

        source.eval()

        def eager():
            with torch.no_grad():
                source(*inputs)

        candidates.append((f"source (torch eager, {torch.get_num_threads()} threads)", eager))
    else:
        candidates.append(("source (onnxruntime)", _ort_runner(source, inputs)))
        if (art_dir / "model.onnx").is_file():
            import onnx

            pruned = onnx.load(str(art_dir / "model.onnx"))
            candidates.append(("pruned (onnxruntime)", _ort_runner(pruned, inputs)))
    arrays = [np.asarray(x) for x in inputs] if not torch_form else [x.numpy() for x in inputs]
    candidates.append((f"artifact (TVM {art.manifest['target'].get('kind')})",
                       lambda: art(*arrays)))  # fmt: skip
    for name, fn in candidates:
        step(f"timing {name}: {warmup} warm-up + {runs} runs")
        rows.append({"name": name, **_time(fn, runs, warmup)})
    res = {"rows": rows, "inputs": rec["inputs"]}
    if save:
        tmp = art_dir / ".bench.json.tmp"
        tmp.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        tmp.replace(art_dir / "bench.json")
    return res


def _ort_runner(proto, inputs) -> Callable[[], Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), inputs)}
    return lambda: sess.run(None, feed)
