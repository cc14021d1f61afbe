"""Dynamic shapes for the torch frontend: which input axes stay symbolic through capture.

``torch.export`` takes ``dynamic_shapes`` (a ``torch.export.Dim`` per input axis, in a dict keyed
by the forward's argument names or a tuple in their order). Without one, :func:`default_request`
makes every input's batch axis (axis 0) dynamic and, for sequence models (integer inputs: token
ids, attention masks), the sequence axis (axis 1) within the model's maximum positions. Inputs
of equal example size share one dim (``batch``, ``seq``), so ``input_ids`` and
``attention_mask`` stay equal.

:func:`export_dynamic` exports with the request. Where torch.export specialises a default axis
(the model's code fixes its size), it takes torch's suggested fix (a narrower range, or a
constant: static) and exports again, recording why; a spec the user gave is never changed
(an error quotes torch's suggestion instead). After capture, :func:`axes_of` names torch's
symbols (``s77``) after the dims, for :attr:`graphprune.ir.Value.symbols`.

Runs inside :func:`graphprune.frontends.torch.capture.capture_torch`; the pruned
``GraphModule`` keeps the program's symbolic sizes, and :class:`InputRanges` (a forward pre-hook)
refuses an input outside the declared ranges with a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphprune.ir.errors import CaptureError, ConfigError
from graphprune.ir.graph import DynamicAxis

#: Upper bound of the default batch dim (torch.export needs none; compiled artifacts do).
DEFAULT_BATCH_MAX = 1024
#: Upper bound of the default sequence dim when the model has no position table or config.
DEFAULT_SEQ_MAX = 2048

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


class Specialised(Exception):
    """torch.export refused the dynamic dims (its "Constraints violated" error)."""


def is_constraint_error(e: BaseException) -> bool:
    return "Constraints violated" in str(e) or "specialized it to be a constant" in str(e)


@dataclass
class DynamicRequest:
    """The dims asked for: per tensor leaf of the bound arguments, ``{axis: Dim}``."""

    labels: list[str]  # one per leaf: the argument name (``inputs_1`` for ``*inputs``)
    dims: list[dict[int, Any]]
    build: Callable[[list[dict[int, Any]]], Any]  # dims per leaf -> torch's dynamic_shapes
    explicit: Any = None  # the user's own spec, passed through unchanged
    static: dict[str, str] = field(default_factory=dict)  # "label[axis]" -> why
    narrowed: dict[str, str] = field(default_factory=dict)  # dim name -> why its range shrank

    def spec(self) -> Any:
        if self.explicit is not None:
            return self.explicit
        return self.build(self.dims) if any(self.dims) else None

    def make_static(self, name: str, why: str) -> None:
        for i, d in enumerate(self.dims):
            for axis in [a for a, dim in d.items() if dim.__name__ == name]:
                del d[axis]
                self.static[f"{self.labels[i]}[{axis}]"] = why

    def replace(self, name: str, new: Any, why: str) -> None:
        for d in self.dims:
            for axis, dim in d.items():
                if dim.__name__ == name:
                    d[axis] = new
        self.narrowed[new.__name__] = why

    def annotate(self, axes: list[DynamicAxis]) -> list[DynamicAxis]:
        """``axes`` with the reason of each narrowed range."""
        return [dataclasses.replace(a, note=self.narrowed.get(a.name, a.note)) for a in axes]

    def all_static(self, why: str) -> None:
        for name in {dim.__name__ for d in self.dims for dim in d.values()}:
            self.make_static(name, why)


def _bound(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _labelled_leaves(bound: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            out.append((name, value))
            continue
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        out += [(f"{name}_{i}", t) for i, t in enumerate(leaves)]
    return out


def _spec(bound: dict[str, Any], dims_of: Callable[[torch.Tensor], dict | None]) -> dict:
    """torch.export's ``dynamic_shapes`` for the bound arguments: ``dims_of(tensor)`` per tensor
    (``None`` or ``{}``: static), the arguments' own nesting elsewhere."""

    def per(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return dims_of(v) or None
        if isinstance(v, (list, tuple)):
            return type(v)(per(x) for x in v)
        if isinstance(v, dict):
            return {k: per(x) for k, x in v.items()}
        return None

    return {name: per(v) for name, v in bound.items()}


def max_positions(model: torch.nn.Module) -> tuple[int | None, str]:
    """The longest sequence the model accepts and where that comes from."""
    # The model's own config, else that of a wrapped transformers model inside it.
    configs = [getattr(m, "config", None) for m in model.modules()]
    for config in [c for c in configs if c is not None][:1]:
        for cfg in (config, getattr(config, "text_config", None)):
            for key in ("max_position_embeddings", "n_positions", "max_source_positions"):
                n = getattr(cfg, key, None) if cfg is not None else None
                if isinstance(n, int) and n > 0:
                    return n, f"config.{key}"
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and "pos" in name.lower().rsplit(".", 1)[-1]:
            return m.num_embeddings, f"position table {name}"
    return None, "no position table found"


def default_request(model: torch.nn.Module, args: tuple, kwargs: dict) -> DynamicRequest | None:
    """Batch dynamic for every tensor input; sequence too for integer inputs (see module doc)."""
    from torch.export import Dim

    bound = _bound(model, args, kwargs)
    if bound is None:
        return None
    labelled = _labelled_leaves(bound)
    seq_max, _ = max_positions(model)
    static: dict[str, str] = {}
    made: dict[tuple[str, int], Any] = {}

    def dim(kind: str, size: int, hi: int) -> Any:
        if (kind, size) not in made:
            n = sum(1 for k, _ in made if k == kind)
            made[(kind, size)] = Dim(kind if n == 0 else f"{kind}_{n + 1}", min=1, max=max(hi, size))
        return made[(kind, size)]

    dims: list[dict[int, Any]] = []
    for label, t in labelled:
        d: dict[int, Any] = {}
        axes = [(0, "batch", DEFAULT_BATCH_MAX)] if t.dim() >= 1 else []
        if t.dim() >= 2 and t.dtype in _INT_DTYPES:
            axes.append((1, "seq", seq_max or DEFAULT_SEQ_MAX))
        for axis, kind, hi in axes:
            if t.shape[axis] < 2:
                static[f"{label}[{axis}]"] = (
                    f"its example size is {t.shape[axis]}: torch.export specialises sizes 0 and "
                    f"1; give an example {kind} of 2 or more to keep it dynamic")
                continue
            d[axis] = dim(kind, int(t.shape[axis]), hi)
        dims.append(d)
    index = {id(t): i for i, (_, t) in enumerate(labelled)}

    def build(per_leaf: list[dict[int, Any]]) -> Any:
        return _spec(bound, lambda t: dict(per_leaf[index[id(t)]]) if id(t) in index else None)

    return DynamicRequest([lb for lb, _ in labelled], dims, build, static=static)


def explicit_request(spec: Any) -> DynamicRequest:
    """The user's own spec, passed to torch.export unchanged (after refusing the ONNX form)."""
    if isinstance(spec, dict) and spec and all(isinstance(v, tuple) and len(v) == 2
                                               and all(isinstance(x, int) for x in v)
                                               for v in spec.values()):  # fmt: skip
        raise ConfigError(
            f"dynamic_shapes={spec!r} is the ONNX form ({{dim_param: (min, max)}}); for a torch "
            "model pass torch.export's own: {'x': {0: torch.export.Dim('batch', min=1, max=64)}}")
    return DynamicRequest([], [], lambda d: spec, explicit=spec)


_FIX = re.compile(r"^\s*(\w+)\s*=\s*(.+?)\s*$")
_DIM = re.compile(r"Dim\('(\w+)'(?:,\s*min=(\d+))?(?:,\s*max=(\d+))?\)")


def apply_fixes(request: DynamicRequest, message: str) -> bool:
    """Follow torch.export's "Suggested fixes" for a default request: a narrower range, a tie to
    another dim, or a constant (static); a dim it names without a fix becomes static. False when
    the message names no dim of the request."""
    from torch.export import Dim

    text = str(message)
    reasons = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")]
    names = {dim.__name__: dim for d in request.dims for dim in d.values()}
    fixes = text.split("Suggested fixes:", 1)[1].splitlines() if "Suggested fixes:" in text else []

    def reason(name: str, default: str) -> str:
        return next((r for r in reasons if re.search(rf"\b{name}\b", r)), default)[:300]

    def why(name: str, default: str) -> str:
        return f"torch.export specialises it: {reason(name, default)}"

    changed = set()
    for line in fixes:
        m = _FIX.match(line)
        if not m or m.group(1) not in names:
            continue
        name, rhs = m.groups()
        d = _DIM.fullmatch(rhs)
        if d and d.group(1) == name:
            lo, hi = int(d.group(2) or 1), int(d.group(3)) if d.group(3) else None
            request.replace(name, Dim(name, min=max(lo, 1), max=hi),
                            f"range narrowed by torch.export: {reason(name, rhs)}")  # fmt: skip
        elif rhs in names and rhs != name:
            request.replace(name, names[rhs], f"{name} tied to {rhs}: {reason(name, rhs)}")
        else:
            request.make_static(name, why(name, rhs))
        changed.add(name)
    violated = re.search(r"Constraints violated \(([^)]*)\)", text)
    for name in (violated.group(1).split(",") if violated else []):
        name = name.strip()
        if name in names and name not in changed:
            request.make_static(name, why(name, "no suggested fix"))
            changed.add(name)
    return bool(changed)


def axes_of(ep: Any, inputs: list[tuple[str, torch.Tensor | Any]]) -> tuple[list[DynamicAxis], dict]:
    """The dynamic input axes of ``ep`` (``inputs``: user-input placeholder name and its meta
    ``val``), and symbol → dim name for :func:`symbols_of`."""
    names = _symbol_names(ep)
    axes = []
    for pname, val in inputs:
        for axis, s in enumerate(val.shape):
            if not isinstance(s, torch.SymInt):
                continue
            expr = s.node.expr
            if not getattr(expr, "is_Symbol", False):
                continue
            rng = ep.range_constraints.get(expr)
            lo = int(rng.lower) if rng is not None and _finite(rng.lower) else 0
            hi = int(rng.upper) if rng is not None and _finite(rng.upper) else None
            axes.append(DynamicAxis(pname, axis, names.get(expr, str(expr)), lo, hi, hint(s)))
    return axes, names


def _finite(x: Any) -> bool:
    try:
        return abs(int(x)) < 2**62
    except (TypeError, ValueError, OverflowError):
        return False


def _symbol_names(ep: Any) -> dict[Any, str]:
    """torch's symbols → the Dim names the spec gave them (torch's own names where unknown)."""
    out: dict[Any, str] = {}
    env = None
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        for s in getattr(v, "shape", ()) if isinstance(v, torch.Tensor) else ():
            if isinstance(s, torch.SymInt):
                env = s.node.shape_env
                break
        if env is not None:
            break
    if env is None:
        return out
    debug = getattr(env, "source_name_to_debug_name", {}) or {}
    for sym, sources in (getattr(env, "var_to_sources", {}) or {}).items():
        for src in sources:
            src_name = src.name() if callable(getattr(src, "name", None)) else getattr(src, "name", "")
            if src_name in debug:
                out[sym] = debug[src_name]
                break
    return out


def hint(s: Any) -> int:
    """The example value of a size (an int, or a SymInt's hint)."""
    if isinstance(s, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(s))
    return int(s)


def symbols_of(val: Any, names: dict[Any, str]) -> tuple[str | None, ...] | None:
    """Per axis of a tensor ``val``, its size expression over dim names (None: static)."""
    if not isinstance(val, torch.Tensor):
        return None
    out: list[str | None] = []
    for s in val.shape:
        if isinstance(s, torch.SymInt):
            expr = s.node.expr
            renamed = {sym: _symbol(names[sym]) for sym in expr.free_symbols if sym in names}
            out.append(str(expr.xreplace(renamed)))
        else:
            out.append(None)
    return tuple(out) if any(o is not None for o in out) else None


def _symbol(name: str) -> Any:
    import sympy

    return sympy.Symbol(name, integer=True, positive=True)


def export_dynamic(export: Callable[[Any], tuple[Any, str]], request: DynamicRequest | None,
                   ) -> tuple[Any, str]:  # fmt: skip
    """``export(spec)`` with the request's dims, following torch's fixes for a default request
    (at most five rounds), then static with the reason recorded (also when the capture fails
    only with dynamic dims); a user's spec is not changed."""
    if request is None:
        return export(None)
    for _ in range(5):
        spec = request.spec()
        try:
            return export(spec)
        except Specialised as e:
            msg = str(e.__cause__ or e)
            if request.explicit is not None:
                raise CaptureError(
                    "torch.export cannot keep the dims of dynamic_shapes= as given: "
                    f"{msg.strip()[:1500]}\nChange the ranges as torch suggests, or leave "
                    "dynamic_shapes out for graphprune's default (batch, sequence).") from e
            if not apply_fixes(request, msg):
                request.all_static("torch.export could not keep it dynamic: "
                                   + msg.strip().splitlines()[0][:300])
        except CaptureError as e:
            if request.explicit is not None or spec is None:
                raise
            # Some failures appear only with symbolic sizes (a data-dependent guard): the default
            # must never make a model uncapturable, so capture it static and say why.
            request.all_static(f"capture failed with it dynamic ({str(e)[:300]}); captured static")
    request.all_static("torch.export still refused the dims after five rounds of its fixes")
    return export(None)


@dataclass
class InputRanges:
    """A forward pre-hook refusing inputs outside the declared dynamic ranges, by name.

    Positional inputs are matched to the program's user inputs in order; an axis out of range
    raises :class:`ConfigError` naming the input, axis, size and range (instead of torch's
    ``Guard failed``)."""

    names: list[str]
    axes: list[DynamicAxis]
    static: dict[str, tuple[int, ...]]  # input name -> example shape (static axes checked)
    signature: inspect.Signature | None = None  # the pruned module's forward, when it has one

    def __call__(self, module: Any, args: tuple, kwargs: dict | None = None) -> None:
        self._check_arguments(args, kwargs or {})
        flat = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        by_name = dict(zip(self.names, flat))
        by_name.update({k: v for k, v in (kwargs or {}).items()
                        if isinstance(v, torch.Tensor) and k in self.names})  # fmt: skip
        dyn = {(a.input, a.axis): a for a in self.axes}
        for name, t in by_name.items():
            want = self.static.get(name)
            if want is not None and t.dim() != len(want):
                raise ConfigError(f"input {name!r} has rank {t.dim()}, the pruned model takes "
                                  f"rank {len(want)} (shape like {list(want)})")  # fmt: skip
            for axis, n in enumerate(t.shape):
                a = dyn.get((name, axis))
                if a is not None:
                    if n < a.min or (a.max is not None and n > a.max):
                        hi = "inf" if a.max is None else a.max
                        raise ConfigError(
                            f"input {name!r} axis {axis} ({a.name}) is {n}, outside the range "
                            f"[{a.min}, {hi}] the model was captured with; capture with "
                            f"dynamic_shapes= covering {n} (torch.export.Dim({a.name!r}, "
                            f"min=..., max=...))")  # fmt: skip
                elif want is not None and axis < len(want) and n != want[axis]:
                    raise ConfigError(
                        f"input {name!r} axis {axis} is {n}, but that axis is static at "
                        f"{want[axis]} in the pruned model (not dynamic when captured)")


    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        """An input the example inputs did not give is not in the captured graph: say so by
        name instead of ``TypeError: forward() got an unexpected keyword argument``."""
        if self.signature is None:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as e:
            takes = ", ".join(self.signature.parameters) or "no inputs"
            raise ConfigError(
                f"the pruned model takes the inputs its example inputs gave at capture ({takes}): "
                f"{e}. A GraphModule result holds only what was captured: pass every optional "
                "input you will use (attention mask, position ids, ...) among the example inputs "
                "of gp.prune (as keyword arguments), and call it the same way") from None


def install_input_check(gm: torch.nn.Module, pg: Any) -> None:
    """Put an :class:`InputRanges` check first among ``gm``'s forward pre-hooks (static axes
    are checked too: a wrong size is named, not a torch ``Guard failed``; so are inputs that
    were not captured)."""
    shapes = {i: tuple(pg.value(i).shape or ()) for i in pg.inputs}
    try:
        signature = inspect.signature(gm.forward)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                     for p in signature.parameters.values()):  # fmt: skip
        signature = None  # takes anything: nothing to check here
    check = InputRanges(list(pg.inputs), list(pg.dynamic_axes), shapes, signature)
    gm.register_forward_pre_hook(check, prepend=True, with_kwargs=True)


def export_pruned(gm: torch.nn.Module, pg: Any) -> Any:
    """``gm`` (a pruned GraphModule of ``pg``'s model) as an ``ExportedProgram`` with the same
    dynamic dims, for ``torch.export.save``; ``torch.export.load(path).module()`` runs it."""
    from torch.export import Dim

    dims = {a.name: Dim(a.name, min=max(a.min, 1), max=a.max) for a in pg.dynamic_axes}
    per_input: dict[str, dict[int, Any]] = {}
    for a in pg.dynamic_axes:
        per_input.setdefault(a.input, {})[a.axis] = dims[a.name]
    args, kwargs = pg.source.args, pg.source.kwargs
    bound = _bound(gm, args, kwargs)
    spec = None
    if bound is not None and per_input:
        leaves = [t for _, t in _labelled_leaves(bound)]
        by_id = {id(t): per_input.get(name) for name, t in zip(pg.inputs, leaves)}
        spec = _spec(bound, lambda t: by_id.get(id(t)))
    try:
        with torch.no_grad():
            return torch.export.export(gm, args, kwargs, dynamic_shapes=spec, strict=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise CaptureError(
            f"exporting the pruned GraphModule failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
