"""``gp.run(recipe)``: the whole compile step as one call.

load → prune → sparsify → recover (distillation) → (fine-tune callback) → quantize → compile →
verify → summary and report, driven by a :mod:`graphprune.app.recipe`. Each step is a public
API (``prune``, ``sparsify``, ``recover``, ``quantize``, ``compile``); this module only chains
them, checks the result and writes the artifact. The other
jobs live in their own modules: :mod:`~graphprune.app.models_io` (the model and its inputs),
:mod:`~graphprune.app.verify`, :mod:`~graphprune.app.summary`, :mod:`~graphprune.app.atomic`
and, for ``graphprune bench``, :mod:`~graphprune.app.bench`.

The artifact directory (``out``) is assembled in a temporary sibling ``.NAME.tmp-*`` and renamed
into place only when every step succeeded (see :mod:`graphprune.app.atomic`). Besides
codegen's ``model.so``, ``weights.npz`` and ``manifest.json`` the artifact holds::

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

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.app.atomic import check_replaceable, staging_dir, swap_into_place
from graphprune.app.models_io import LoadedModel, load_model, load_recipe_model
from graphprune.app.recipe import Recipe, load_recipe
from graphprune.app.summary import summarise
from graphprune.app.verify import verify_artifact
from graphprune.ir.errors import ConfigError

# load_model is re-exported: it was defined here and is part of this module's public names
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


class StepClock:
    """Announces each step through ``progress`` and records its wall time in ``timings``."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress or (lambda msg: None)
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, msg: str) -> Iterator[None]:
        self.progress(msg)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t, 3)


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
    rec = _with_out(load_recipe(recipe), out)
    out_dir = Path(rec["out"])
    check_replaceable(out_dir, force)
    clock = StepClock(progress)
    with staging_dir(out_dir) as tmp:
        result = _run_into(rec, tmp / "artifact", clock, fine_tune)
        clock.progress(f"moving artifact into place: {out_dir}")
        swap_into_place(tmp / "artifact", out_dir, force)
    result.out_dir = out_dir
    for attr in ("report_html", "report_md"):
        p = getattr(result, attr)
        if p is not None:
            setattr(result, attr, out_dir / p.name)
    from graphprune.runtime import load

    result.artifact = load(out_dir)
    return result


def _with_out(rec: Recipe, out: str | os.PathLike | None) -> Recipe:
    """``rec`` with ``out`` (when given) as its artifact directory; one is required."""
    data = rec.to_dict()
    if out is not None:
        data["out"] = os.path.abspath(out)
    if data["out"] is None:
        raise ConfigError(f"{rec.source}: out: missing; give the artifact directory in the recipe "
                          f"or with -o/--out")  # fmt: skip
    return Recipe(data, rec.source, rec.base_dir)


def _run_into(rec: Recipe, art_dir: Path, clock: StepClock, fine_tune) -> PipelineResult:
    """Every step of the run, writing the artifact into ``art_dir`` (not yet in place)."""
    data, seed = rec.to_dict(), rec["seed"]
    with clock.step("load", f"loading model {data['model']}"):
        loaded = load_recipe_model(rec)
    data["inputs"] = loaded.specs  # resolved: a replay builds the same inputs
    _seed(seed)
    model, graph, prune_report = _prune(data["prune"], loaded, seed, clock)
    model, sp_report, masks, sp_graph = _sparsify(data["sparsify"], model, loaded, seed, clock)
    recovery = _recover(data["recover"], model, loaded, masks, seed, clock)
    model = recovery.model if recovery is not None else model
    if fine_tune is not None:
        model = _fine_tune(fine_tune, model, loaded, masks, clock)
    quantized = _quantize(data.get("quantize"), model, loaded, sp_graph, clock)
    if quantized is not None:  # compile the float model with graph.quant; verify against fake-quant
        sp_graph, model = quantized.graph, quantized.model
    art = _compile(data["compile"], model if quantized is None else quantized.float_model(),
                   loaded.inputs, art_dir, clock, sp_graph)  # fmt: skip
    with clock.step("verify", "verifying the artifact against the model it was compiled from"):
        verify = verify_artifact(art, model, loaded.source, loaded.inputs, data["verify"])
    summary = {"model": data["model"], "frontend": loaded.kind,
               **summarise(prune_report, sp_report, graph, art.manifest, verify)}  # fmt: skip
    if recovery is not None:
        r = recovery.report
        summary["recover"] = {"steps": r.steps, "output_loss": r.output_loss,
                              "hidden_layers": len(r.hidden_layers), "masked_params":
                              r.masked_params, "loss_before": round(r.loss_before, 6),
                              "loss_after": round(r.loss_after, 6)}  # fmt: skip
    if quantized is not None:
        r = quantized.report
        summary["quantize"] = {"scheme": r.scheme, "layers": len(r.layers),
                               "max_rel_error": r.max_rel_error, "excluded": r.excluded,
                               "smoothed": r.smoothed, "notes": r.notes}  # fmt: skip
    result = PipelineResult(art_dir, art, model, data, summary, clock.timings)
    result.report_html, result.report_md = _write_files(art_dir, loaded.kind, model, data,
                                                        summary, clock)  # fmt: skip
    return result


def _seed(seed: int) -> None:
    np.random.seed(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def _prune(settings: dict | None, loaded: LoadedModel, seed: int, clock: StepClock):
    """``(model, graph, report)`` after the recipe's ``prune:`` (the source itself without one)."""
    if settings is None:
        return loaded.source, None, None
    from graphprune.api.structured import prune

    p = dict(settings)
    inputs = loaded.inputs if loaded.kind == "torch" else None
    with clock.step("prune", f"pruning (criterion={p['criterion']}, scope={p['scope']})"):
        drop, unit = p.pop("drop_blocks"), p.pop("depth_unit")
        if drop:
            res = prune(loaded.source, inputs, criterion=p["criterion"], calib=loaded.calib,
                        drop_blocks=drop, depth_unit=unit, seed=seed)  # fmt: skip
        else:
            res = prune(loaded.source, inputs, calib=loaded.calib, seed=seed, **p)
    return res.model, res.graph, res.report


def _sparsify(settings: dict | None, model: Any, loaded: LoadedModel, seed: int,
              clock: StepClock):  # fmt: skip
    """``(model, report, masks, graph)`` after the recipe's ``sparsify:`` (unchanged without one);
    ``graph`` carries the masks compile uses (None when the sparsified model did not capture)."""
    if settings is None:
        return model, None, {}, None
    from graphprune.api.sparsify import sparsify

    s = settings
    with clock.step("sparsify", f"sparsifying ({s['pattern']}, {s['method']})"):
        kw = {k: s[k] for k in ("sparsity", "pattern", "method", "scope", "min_keep", "exclude")}
        if loaded.kind == "torch":
            res = sparsify(model, loaded.inputs, calib=loaded.calib, seed=seed, **kw)
        else:
            res = sparsify(model, None, seed=seed, **kw)
    return res.model, res.report, res.masks, res.graph


def _quantize(settings: dict | None, model: Any, loaded: LoadedModel, graph: Any,
              clock: StepClock) -> Any:  # fmt: skip
    """The recipe's ``quantize:`` (:func:`graphprune.quantize`, after sparsify, masks kept on
    ``graph``), or None without one."""
    if settings is None:
        return None
    from graphprune.api.quantize import quantize

    q = settings
    with clock.step("quantize", f"quantizing ({q['scheme']})"):
        return quantize(model, loaded.inputs if loaded.kind == "torch" else None,
                        calib=loaded.calib, graph=graph, **q)


def _recover(settings: dict | None, model: Any, loaded: LoadedModel, masks: dict, seed: int,
             clock: StepClock):  # fmt: skip
    """The recipe's ``recover:`` (``gp.recover`` against the dense source model, sparsity masks
    held) or ``None`` without one; data from ``recover.text`` or the calibration batches."""
    if settings is None:
        return None
    from graphprune.api.recover import recover

    r = settings
    data = _recover_data(r, loaded) if r["text"] is not None else loaded.calib
    with clock.step("recover", f"recovering by distillation ({r['steps']} steps)"):
        return recover(model, loaded.source, data, steps=r["steps"], lr=r["lr"],
                       output_loss=r["output_loss"], temperature=r["temperature"],
                       hidden_weight=r["hidden_weight"], masks=masks or None, seed=seed,
                       progress=False)  # fmt: skip


def _recover_data(r: dict, loaded: LoadedModel) -> list[tuple]:
    """``recover.text`` tokenised into batches of the model's inputs, in their order."""
    from graphprune.api.recover import text_batches

    path = Path(r["text"])
    if not path.is_file():
        raise ConfigError(f"recover.text: {path} not found")
    tok = _tokenizer(r["tokenizer"], loaded.source)
    batches = text_batches(tok, path.read_text(encoding="utf-8", errors="replace"),
                           batch_size=r["batch_size"], seq_len=r["seq_len"], mode=r["mode"])
    names = list(loaded.specs)
    missing = [n for n in names if n not in batches[0]]
    if missing:
        raise ConfigError(f"recover.text: the tokenizer gives {sorted(batches[0])}, the model "
                          f"takes {names}: {missing} missing; use calib: batches instead")
    return [tuple(b[n] for n in names) for b in batches]


def _tokenizer(name: str | None, model: Any) -> Any:
    """``name`` (a tokenizer folder), else the tokenizer saved with the transformers model."""
    if name is None:
        cfgs = [getattr(getattr(m, "config", None), "_name_or_path", "") for m in model.modules()]
        name = next((c for c in cfgs if c and os.path.isdir(c)), None)
        if name is None:
            raise ConfigError("recover.text needs a tokenizer: give recover.tokenizer (a "
                              "tokenizer folder) or use the calib: batches")  # fmt: skip
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # any load failure is the recipe's to fix
        raise ConfigError(f"recover.tokenizer: cannot load a tokenizer from {name!r} "
                          f"({type(e).__name__}: {e})") from e


def _fine_tune(fine_tune: Callable, model: Any, loaded: LoadedModel, masks: dict,
               clock: StepClock) -> Any:  # fmt: skip
    """The user's callback on the torch model; sparsity masks are re-applied to its result."""
    if loaded.kind != "torch":
        raise ConfigError("fine_tune is for torch models; an ONNX model cannot be trained here")
    with clock.step("fine_tune", "fine-tuning (user callback)"):
        tuned = fine_tune(model, loaded.inputs, loaded.calib)
        model = model if tuned is None else tuned
        _reapply_masks(model, masks)
    return model


def _reapply_masks(model: Any, masks: dict) -> None:
    if not masks:
        return
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            if name in params and params[name].shape == m.shape:
                params[name].mul_(m.to(params[name].dtype))


def _compile(settings: dict, model: Any, inputs: tuple, art_dir: Path, clock: StepClock,
             graph: Any = None) -> Any:  # fmt: skip
    """The artifact; ``graph`` (sparsify's) gives the sparsity masks, which are then not
    re-detected from zeros (a fine-tune keeps them: its result is re-masked)."""
    from graphprune.codegen.compiler import compile as compile_model

    c = settings
    with clock.step("compile", f"compiling for {c['target']} (schedule {c['schedule']})"):
        return compile_model(model, inputs, target=c["target"], out_dir=art_dir,
                             schedule=c["schedule"], kernels=c["kernels"], graph=graph,
                             int8_tolerance=c.get("int8_tolerance"),
                             progress=lambda m: clock.progress("  " + m))  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_files(art_dir: Path, kind: str, model: Any, data: dict, summary: dict,
                 clock: StepClock) -> tuple[Path | None, Path | None]:  # fmt: skip
    """The pruned ONNX model, recipe.json, summary.json, run.json and (when asked) the report;
    returns the report's paths."""
    if kind == "onnx":  # external data beside it when the model is past protobuf's 2 GB
        from graphprune.frontends.onnx.files import save_onnx

        save_onnx(model, art_dir / "model.onnx")
    _write_json(art_dir / "recipe.json", data)
    _write_json(art_dir / "summary.json", summary)
    _write_json(art_dir / "run.json", {"timings_s": clock.timings})
    if not data["report"]:
        return None, None
    with clock.step("report", "writing report.html and report.md"):
        from graphprune.app.report import write_report

        html, md = write_report(art_dir)
    _write_json(art_dir / "run.json", {"timings_s": clock.timings})  # now with the report's time
    return html, md
