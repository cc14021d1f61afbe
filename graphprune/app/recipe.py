"""Recipes: one YAML or JSON file that drives :func:`graphprune.app.pipeline.run`.

A recipe names a model, its inputs and the steps to apply; every key is checked against one
schema table (:data:`SCHEMA`) before any work starts, so a typo, a wrong type or two fields that
contradict each other fail at once with a message naming the key (``prune.ratoi: unknown key; did
you mean 'ratio'?``). :func:`load_recipe` returns a :class:`Recipe` whose :meth:`Recipe.to_dict`
is the *resolved* recipe: every default filled in and every path absolute, which the pipeline
writes into the artifact so ``graphprune run ARTIFACT/recipe.json`` replays the run.

Example (YAML; JSON works the same)::

    model: resnet_tiny                 # a zoo name, a .onnx path or "pkg.module:factory"
    inputs: {x: [2, 3, 32, 32]}        # or {x: {shape: [2, 16], dtype: int64, high: 1000}}
    prune:    {ratio: 0.3, criterion: l2, scope: global, round_to: 4}
    sparsify: {pattern: "2:4", method: magnitude}
    recover:  {steps: 100, lr: 1.0e-4}  # distil against the dense model (gp.recover)
    quantize: {scheme: w8a8_static}   # INT8, before compile (static: needs calib:)
    calib:    {source: random, batches: 4}   # or an .npz with one array per input name
    compile:  {target: llvm}
    verify:   {atol: 1.0e-4}
    out: build/resnet_tiny

``recover:`` fine-tunes the pruned/sparsified torch model against the dense one with its masks
held (:func:`graphprune.api.recover.recover`), on ``recover.text`` (a text file, tokenised with
``recover.tokenizer`` or the transformers model's own tokenizer) or else the ``calib:`` batches.

Relative paths (``model``, ``calib.source``, ``recover.text``, ``out``) are relative to the
recipe file's folder.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphprune.ir.errors import ConfigError

__all__ = ["RECIPE_VERSION", "SCHEMA", "Recipe", "load_recipe"]

RECIPE_VERSION = 1

#: criteria / methods that read calibration data (pass ``calib:``)
_DATA_CRITERIA = {"taylor", "hessian", "activation", "apoz", "wanda"}
_DATA_METHODS = {"wanda", "obd", "sparsegpt", "taylor", "snip", "grasp"}
_ONNX_METHODS = {"magnitude", "random"}
_DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")


@dataclass(frozen=True)
class Field:
    """One key: its type (``float``, ``int``, ``bool``, ``str``, ``list[str]``, ``dict[str,float]``,
    optionally ``|null``), default, allowed values and bounds."""

    kind: str
    default: Any = None
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    hi_open: bool = False
    required: bool = False
    doc: str = ""


SCHEMA: dict[str, dict[str, Field] | Field] = {
    "version": Field("int", RECIPE_VERSION, choices=(RECIPE_VERSION,)),
    "model": Field("str", required=True, doc="zoo name, .onnx path or pkg.module:factory"),
    "inputs": Field("inputs|null", None, doc="{name: shape} or {name: {shape, dtype, low, high}}"),
    "seed": Field("int", 0, lo=0),
    "out": Field("str|null", None, doc="artifact directory"),
    "report": Field("bool", True, doc="write report.html / report.md into the artifact"),
    "prune": {
        "ratio": Field("float", 0.5, lo=0.0, hi=1.0, hi_open=True),
        "criterion": Field("str", "l2", choices=("l1", "l2", "random", "fpgm", "bn_scale",
                                                  "taylor", "hessian", "activation", "apoz",
                                                  "wanda")),  # fmt: skip
        "scope": Field("str", "local", choices=("local", "global")),
        "target_macs": Field("float|null", None, lo=0.0, hi=1.0),
        "target_params": Field("float|null", None, lo=0.0, hi=1.0),
        "round_to": Field("int|null", None, lo=1),
        "min_keep": Field("float", 0.1, lo=0.0, hi=1.0),
        "heads": Field("bool", True),
        "ignore": Field("list[str]|null", None),
        "ratios": Field("dict[str,float]|null", None),
        "drop_blocks": Field("int", 0, lo=0),
        "depth_unit": Field("str", "branch", choices=("branch", "layer")),
    },
    "sparsify": {
        "sparsity": Field("float|null", None, lo=0.0, hi=1.0, hi_open=True),
        "pattern": Field("str", "unstructured"),
        "method": Field("str", "magnitude", choices=("magnitude", "random", "wanda", "obd",
                                                      "sparsegpt", "taylor", "snip", "grasp",
                                                      "synflow")),  # fmt: skip
        "scope": Field("str", "layer", choices=("layer", "global")),
        "min_keep": Field("float", 0.0, lo=0.0, hi=1.0),
        "exclude": Field("list[str]|null", None),
    },
    "quantize": {
        "scheme": Field("str", "w8a8_dynamic", choices=("w8", "w8a8_dynamic", "w8a8_static")),
        "smooth": Field("float|null", None, lo=0.0, hi=1.0, hi_open=True),
        "observer": Field("str", "minmax", choices=("minmax", "percentile", "mse")),
        "percentile": Field("float|null", None, lo=50.0, hi=100.0),
        "exclude": Field("list[str]|null", None),
    },
    "recover": {
        "steps": Field("int", 100, lo=1),
        "lr": Field("float", 1e-4, lo=0.0),
        "text": Field("str|null", None, doc="a text file to distil on (else the calib batches)"),
        "tokenizer": Field("str|null", None, doc="tokenizer folder (default: the model's own)"),
        "mode": Field("str", "stream", choices=("stream", "lines")),
        "seq_len": Field("int", 128, lo=1),
        "batch_size": Field("int", 8, lo=1),
        "output_loss": Field("str", "auto", choices=("auto", "kl", "mse", "cosine")),
        "temperature": Field("float", 2.0, lo=0.0),
        "hidden_weight": Field("float", 1.0, lo=0.0),
    },
    "calib": {
        "source": Field("str", "random", doc='"random" or an .npz path (one array per input)'),
        "batches": Field("int", 4, lo=1),
    },
    "compile": {
        "target": Field("str", "llvm", choices=("llvm", "cuda")),
        "schedule": Field("str", "ours", choices=("ours", "stock", "dlight")),
        "kernels": Field("str", "auto"),
        "int8_tolerance": Field("float|null", None, lo=0.0,
                                doc="largest relative output error of a layer in int8 on the "
                                    "calibration data; a layer above it stays fp32 (needs "
                                    "quantize:)"),  # fmt: skip
    },
    "verify": {
        "atol": Field("float", 1e-4, lo=0.0),
        "rtol": Field("float", 1e-4, lo=0.0),
        "enabled": Field("bool", True),
    },
}


@dataclass
class Recipe:
    """A validated recipe. ``data`` is resolved (defaults filled, paths absolute); a step whose
    section is absent is ``None`` there and is skipped."""

    data: dict
    source: str = "<recipe>"
    base_dir: Path = field(default_factory=Path.cwd)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.data))

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True) + "\n"

    @property
    def is_onnx(self) -> bool:
        return self.data["model"].endswith(".onnx")


def load_recipe(recipe: Any, base_dir: str | os.PathLike | None = None) -> Recipe:
    """Read (a path), check and resolve a recipe.

    Parameters
    ----------
    recipe : str, os.PathLike, dict or Recipe
        A ``.yaml`` / ``.yml`` / ``.json`` file, or the recipe as a mapping.
    base_dir : path, optional
        Folder relative paths are resolved against (default: the file's folder, else the cwd).

    Raises
    ------
    ConfigError
        The file is missing or unparsable, a key is unknown, a value has the wrong type or is
        out of range, or two fields contradict each other.

    Examples
    --------
    >>> r = load_recipe({"model": "resnet_tiny", "prune": {"ratio": 0.25}, "out": "/tmp/a"})
    >>> r["prune"]["ratio"], r["prune"]["criterion"], r["sparsify"]
    (0.25, 'l2', None)
    >>> load_recipe({"model": "resnet_tiny", "prune": {"ratoi": 0.25}})
    Traceback (most recent call last):
    ...
    graphprune.ir.errors.ConfigError: <recipe>: prune.ratoi: unknown key; did you mean 'ratio'?
    """
    if isinstance(recipe, Recipe):
        return recipe
    source = "<recipe>"
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        source = str(path)
        raw = _read(path)
        base = Path(base_dir) if base_dir is not None else path.absolute().parent
    elif isinstance(recipe, dict):
        raw = recipe
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        raise ConfigError(f"a recipe is a file path or a mapping, not {type(recipe).__name__}")
    data = _validate(raw, source)
    _resolve_paths(data, base.absolute())
    _check_contradictions(data, source)
    return Recipe(data, source, base.absolute())


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from e
    except Exception as e:  # yaml.YAMLError carries the line in its str()
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def _unknown(key: str, known, where: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{source}: {where}{key}: unknown key; {hint}")


def _validate(raw: Any, source: str) -> dict:
    if raw is None:
        raise ConfigError(f"{source}: the recipe is empty; it needs at least 'model:'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of keys, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key in raw:
        if key not in SCHEMA:
            raise _unknown(str(key), SCHEMA, "", source)
    for key, spec in SCHEMA.items():
        if isinstance(spec, Field):
            if key not in raw or raw[key] is None:
                if spec.required:
                    raise ConfigError(f"{source}: {key}: missing ({spec.doc})")
                out[key] = spec.default
            else:
                out[key] = _check(raw[key], spec, key, source)
            continue
        section = raw.get(key)
        if section is None:
            out[key] = None
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping of options (use {{}} for the "
                              f"defaults), got {type(section).__name__} {section!r}")  # fmt: skip
        for sub in section:
            if sub not in spec:
                raise _unknown(str(sub), spec, f"{key}.", source)
        out[key] = {
            sub: (_check(section[sub], f, f"{key}.{sub}", source) if section.get(sub) is not None
                  else f.default)
            for sub, f in spec.items()
        }  # fmt: skip
    out["_explicit"] = {k: sorted(v) for k, v in raw.items() if isinstance(v, dict)}
    return out


def _check(value: Any, f: Field, where: str, source: str) -> Any:
    kind = f.kind.replace("|null", "")
    bad = ConfigError(f"{source}: {where}: expected {kind}, got {type(value).__name__} {value!r}")
    if kind == "inputs":
        return _check_inputs(value, where, source)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise bad
    elif kind == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
    elif kind == "dict[str,float]":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in value.items()
        ):
            raise bad
        value = {k: float(v) for k, v in value.items()}
    if f.choices is not None and value not in f.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in f.choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: {where}: {value!r} is not one of "
                          f"{', '.join(map(str, f.choices))}{hint}")  # fmt: skip
    if f.lo is not None and value < f.lo or (
        f.hi is not None and (value >= f.hi if f.hi_open else value > f.hi)
    ):
        rng = f"[{f.lo}, {f.hi})" if f.hi_open else f"[{f.lo}, {f.hi}]"
        rng = rng if f.hi is not None else f">= {f.lo}"
        raise ConfigError(f"{source}: {where}: {value!r} is out of range {rng}")
    return value


def _check_inputs(value: Any, where: str, source: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source}: {where}: expected a mapping {{input name: shape}}, e.g. "
                          f"{{x: [2, 3, 32, 32]}}, got {value!r}")  # fmt: skip
    out = {}
    for name, spec in value.items():
        w = f"{where}.{name}"
        if isinstance(spec, list):
            spec = {"shape": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: {w}: expected a shape list or {{shape, dtype}}, got "
                              f"{spec!r}")  # fmt: skip
        for k in spec:
            if k not in ("shape", "dtype", "low", "high"):
                raise _unknown(str(k), ("shape", "dtype", "low", "high"), f"{w}.", source)
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            raise ConfigError(f"{source}: {w}.shape: expected a list of positive integers, got "
                              f"{shape!r}")  # fmt: skip
        dtype = spec.get("dtype", "float32")
        if dtype not in _DTYPES:
            raise ConfigError(f"{source}: {w}.dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
        low, high = spec.get("low", 0), spec.get("high", 2 if dtype == "bool" else 100)
        for k, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: {w}.{k}: expected a number, got {v!r}")
        if high <= low:
            raise ConfigError(f"{source}: {w}: high={high} must be greater than low={low}")
        out[str(name)] = {"shape": shape, "dtype": dtype, "low": low, "high": high}
    return out


def _resolve_paths(data: dict, base: Path) -> None:
    model = data["model"]
    if model.endswith(".onnx"):
        data["model"] = os.path.normpath(base / model)
    elif ":" in model:
        target, _, attr = model.rpartition(":")
        if target.endswith(".py"):  # a script path: "factories/mine.py:build"
            data["model"] = f"{os.path.normpath(base / target)}:{attr}"
    if data["out"] is not None:
        data["out"] = os.path.normpath(base / data["out"])
    rec = data.get("recover")
    if rec:
        for key in ("text", "tokenizer"):
            if rec[key] is not None and (key == "text" or os.path.exists(base / rec[key])):
                rec[key] = os.path.normpath(base / rec[key])
    calib = data.get("calib")
    if calib and calib["source"] != "random":
        calib["source"] = os.path.normpath(base / calib["source"])


def _check_contradictions(data: dict, source: str) -> None:
    explicit = data.pop("_explicit")
    prune, sp, calib = data["prune"], data["sparsify"], data["calib"]

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if prune is not None:
        given = set(explicit.get("prune", ()))
        if prune["target_macs"] is not None and prune["target_params"] is not None:
            fail("prune.target_macs and prune.target_params contradict each other: give one")
        target = "target_macs" if prune["target_macs"] is not None else (
            "target_params" if prune["target_params"] is not None else None)  # fmt: skip
        if target and "ratio" in given:
            fail(f"prune.ratio contradicts prune.{target}: the ratio is searched to reach the "
                 f"target; remove one of them")  # fmt: skip
        if prune["drop_blocks"] and (target or "ratio" in given):
            fail("prune.drop_blocks (depth pruning) contradicts prune.ratio / targets (width "
                 "pruning): run them as two recipes")  # fmt: skip
        if prune["criterion"] in _DATA_CRITERIA and calib is None:
            fail(f"prune.criterion {prune['criterion']!r} reads calibration data: add a calib: "
                 f"section (e.g. calib: {{source: random, batches: 4}})")  # fmt: skip
    if sp is not None:
        pat = sp["pattern"]
        if ":" in pat and not pat.startswith("block"):
            try:
                n, m = (int(t) for t in pat.split(":"))
            except ValueError:
                fail(f"sparsify.pattern {pat!r}: N:M wants two integers, e.g. '2:4'")
            if not 0 < n < m:
                fail(f"sparsify.pattern {pat!r}: N:M needs 0 < N < M")
            implied = 1 - n / m
            if sp["sparsity"] is not None and abs(sp["sparsity"] - implied) > 1e-9:
                fail(f"sparsify.sparsity {sp['sparsity']} contradicts sparsify.pattern {pat!r}, "
                     f"which fixes sparsity at {implied:g}; remove sparsify.sparsity")  # fmt: skip
        elif pat != "unstructured" and not pat.startswith("block:"):
            fail(f"sparsify.pattern {pat!r}: use 'unstructured', 'N:M' (e.g. '2:4') or "
                 f"'block:RxC'")  # fmt: skip
        if sp["method"] in _DATA_METHODS and calib is None:
            fail(f"sparsify.method {sp['method']!r} reads calibration data: add a calib: section")
        if data["model"].endswith(".onnx") and sp["method"] not in _ONNX_METHODS:
            fail(f"sparsify.method {sp['method']!r} is torch-only; an ONNX model supports "
                 f"{' and '.join(sorted(_ONNX_METHODS))}")  # fmt: skip
    q = data.get("quantize")
    if q is not None:
        if (q["scheme"] == "w8a8_static" or q["smooth"]) and calib is None:
            fail(f"quantize.{'scheme w8a8_static' if not q['smooth'] else 'smooth'} observes "
                 "activations: add a calib: section")  # fmt: skip
        if q["smooth"] is not None and data["model"].endswith(".onnx"):
            fail("quantize.smooth rewrites torch parameters; an ONNX model takes no smooth")
        if (q["observer"] != "minmax" or q["percentile"] is not None) and (
                q["scheme"] != "w8a8_static"):  # fmt: skip
            fail("quantize.observer / percentile set static input scales: use scheme w8a8_static")
    comp = data.get("compile")
    if comp is not None and comp.get("int8_tolerance") is not None and q is None:
        fail("compile.int8_tolerance keeps layers over it in fp32 after a quantize: step; add a "
             "quantize: section or drop int8_tolerance")  # fmt: skip
    rec = data["recover"]
    if rec is not None:
        if data["model"].endswith(".onnx"):
            fail("recover: fine-tunes a torch model; an ONNX model cannot be trained here "
                 "(remove the recover: section)")
        if prune is None and sp is None:
            fail("recover: has nothing to recover from: add a prune: or sparsify: section")
        if rec["text"] is None and calib is None:
            fail("recover: needs data: give recover.text (a text file) or a calib: section")
        if rec["temperature"] <= 0:
            fail(f"recover.temperature: {rec['temperature']!r} must be > 0")
        if rec["lr"] <= 0:
            fail(f"recover.lr: {rec['lr']!r} must be > 0")
    if calib is not None and calib["source"] != "random" and not calib["source"].endswith(".npz"):
        fail(f"calib.source {calib['source']!r}: use 'random' or an .npz file")
    if data["verify"] is None:
        data["verify"] = {k: f.default for k, f in SCHEMA["verify"].items()}
    if data["compile"] is None:
        data["compile"] = {k: f.default for k, f in SCHEMA["compile"].items()}
