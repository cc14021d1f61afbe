"""The model a recipe names, and the inputs it runs on.

First step of :func:`graphprune.app.pipeline.run` (and of ``graphprune bench``): load the model
from a zoo name, a ``.onnx`` path or a python factory, then settle its example inputs and
calibration batches. Inputs are synthesised from the recipe's seed, so a replay of the resolved
recipe (``ARTIFACT/recipe.json``) runs on exactly the same arrays.

An input *spec* is ``{name: {"shape": [...], "dtype": str, "low": int, "high": int}}`` (``low`` /
``high`` bound integer inputs), the form :mod:`graphprune.app.recipe` resolves ``inputs:`` to.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.app.recipe import Recipe
from graphprune.frontends import kind_of
from graphprune.ir.errors import CaptureError, ConfigError

__all__ = [
    "LoadedModel",
    "calibration_batches",
    "input_names",
    "load_model",
    "load_recipe_model",
    "make_inputs",
    "onnx_input_specs",
]


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
    made = _call_factory(spec, base_dir)
    if isinstance(made, tuple) and len(made) == 2:
        model, inputs = made
        return model, tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    return made, None


def _call_factory(spec: str, base_dir: Path | None) -> Any:
    """Import ``module:attr`` (a dotted module, found also in ``base_dir``, or a ``.py`` file) and
    call ``attr()``; every failure is a :class:`ConfigError` naming the spec."""
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
        return fn()
    except Exception as e:
        raise ConfigError(f"model: {spec}() raised {type(e).__name__}: {e}") from e


# --- inputs --------------------------------------------------------------------------------------


def make_inputs(specs: dict, seed: int, torch_form: bool) -> tuple:
    """One array per spec, drawn from ``seed`` (normal floats, integers in ``[low, high)``,
    random bools); torch tensors when ``torch_form``."""
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


def onnx_input_specs(proto: Any) -> dict:
    """Specs of an ONNX model's graph inputs (initializers excluded); dynamic shapes are refused."""
    from onnx import helper

    inits = {t.name for t in proto.graph.initializer}
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


def calibration_batches(recipe: Recipe, specs: dict, torch_form: bool) -> list | None:
    """The recipe's ``calib:`` batches: ``random`` ones seeded after the example inputs, or
    consecutive batches of the example batch size cut from an ``.npz`` (one array per input,
    matched by name, else by position)."""
    cal = recipe["calib"]
    if cal is None:
        return None
    n = cal["batches"]
    if cal["source"] == "random":
        return [make_inputs(specs, recipe["seed"] + 1 + i, torch_form) for i in range(n)]
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


def input_names(model: Any, n: int) -> list[str]:
    """The first ``n`` positional parameter names of ``model.forward``, else ``input0..``."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        names = [p.name for p in params[:n]]
    except (TypeError, ValueError):
        names = []
    return names if len(names) == n else [f"input{i}" for i in range(n)]


def _same_specs(a: dict, b: dict) -> bool:
    strip = lambda d: [(s["shape"], s["dtype"]) for s in d.values()]
    return strip(a) == strip(b)


# --- the load step -------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A recipe's model, ready to prune: ``kind`` is ``"torch"`` or ``"onnx"``, ``specs`` the
    resolved input specs (written back into the recipe), ``inputs`` the example inputs (torch
    tensors for torch models, numpy arrays for ONNX) and ``calib`` the calibration batches."""

    source: Any
    kind: str
    specs: dict
    inputs: tuple
    calib: list | None


def load_recipe_model(rec: Recipe) -> LoadedModel:
    """Load ``rec``'s model and settle its inputs: the factory's own (seeded) inputs when the
    recipe asks for no other shapes, else arrays synthesised from the recipe's specs (or, for
    ONNX, from the model's declared input shapes)."""
    spec, wanted = rec["model"], rec["inputs"]
    source, given = load_model(spec, rec.base_dir)
    try:
        kind = kind_of(source)
    except CaptureError:
        kind = None
    if kind is None or isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"model: {spec} gave a {type(source).__name__}, not a "
                          f"torch.nn.Module or (module, inputs)")  # fmt: skip
    torch_form = kind == "torch"
    if torch_form:
        source.eval()
    given_specs = None
    if given is not None:
        names = input_names(source, len(given))
        given_specs = {
            n: {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                "low": 0, "high": 100}
            for n, x in zip(names, given)
        }  # fmt: skip
    # the factory's own (seeded) inputs win when the recipe asks for the same shapes, so a
    # replay of a resolved recipe runs on exactly the inputs of the first run
    if given_specs is not None and (wanted is None or _same_specs(wanted, given_specs)):
        specs, inputs = wanted or given_specs, tuple(given)
    elif wanted is not None:
        specs, inputs = wanted, make_inputs(wanted, rec["seed"], torch_form)
    elif not torch_form:
        specs = onnx_input_specs(source)
        inputs = make_inputs(specs, rec["seed"], False)
    else:
        raise ConfigError(f"model: {spec} returned no example inputs: give their "
                          f"shapes in the recipe's inputs: {{name: [...]}}")  # fmt: skip
    calib = calibration_batches(rec, specs, torch_form)
    return LoadedModel(source, kind, specs, inputs, calib)
