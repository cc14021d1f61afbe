"""Hugging Face ``transformers`` models through capture and write-back.

A pruned ``PreTrainedModel`` should stay one: the same class, smaller layers, every attribute its
``forward`` reads updated (``num_heads``, ``num_key_value_heads``, ``head_dim``, ``all_head_size``,
``split_size``, ``intermediate_size``, ``hidden_size``, GPT-2's ``Conv1D.nf``/``nx``) and, where
every layer agrees, the config, so ``save_pretrained`` → ``from_pretrained`` rebuilds it with no
graphprune installed. What a config can express differs by family: Llama, Qwen2, Mistral and ViT
read ``config.head_dim``, so whole heads, MLP width and the residual width can all shrink, and
T5 ``d_kv`` (its attention's ``key_value_proj_dim``) with ``num_heads`` and ``d_ff``; BERT,
GPT-2 and Whisper compute the head size as hidden ÷ heads, so only the MLP width can (Whisper's
``encoder_ffn_dim``; its convolutional front end has no config field). :func:`probe_kinds`
asks the class itself (a config change, a model built on the meta device) rather than a table.

Results the config cannot express are saved with :func:`save_pruned` (safetensors weights, the
original config, and a JSON plan of per-module shapes and attributes) and rebuilt by
:func:`load_pruned`. No pickle.

Runs in the torch frontend: capture (:func:`capture_mode`), module-form write-back
(:func:`update_modules`), and the ``from_pretrained`` entry point. ``transformers`` is imported
only when the model already is one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from graphprune.ir.errors import ConfigError

PLAN_FILE = "graphprune_plan.json"
# Whisper's config has encoder_ffn_dim and decoder_ffn_dim: an encoder alone reads the first.
_MLP_SIZE = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim")
_HEAD_SIZE = ("head_dim", "attention_head_size", "key_value_proj_dim")  # T5: d_kv
_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
# An MLP block's first projection: Llama/Qwen2 (gate, up), Whisper/OPT, GPT-2, T5, gated T5.
_MLP_IN = ("gate_proj", "up_proj", "fc1", "c_fc", "wi", "wi_0")


def is_hf(model: Any) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


@contextlib.contextmanager
def capture_mode(model: Any) -> Iterator[None]:
    """Capture without a KV cache: a ``DynamicCache`` in the output is not an exportable type,
    and a pruned model builds its own cache from its (updated) attributes at run time."""
    cfg = getattr(model, "config", None) if is_hf(model) else None
    if cfg is None or not hasattr(cfg, "use_cache"):
        yield
        return
    saved = cfg.use_cache
    cfg.use_cache = False
    try:
        yield
    finally:
        cfg.use_cache = saved


# -- which groups the config can express ---------------------------------------------------------
def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if any(hasattr(m, a) for a in _HEAD_SIZE) and _widths(m) is not None]  # fmt: skip


def _widths(m: nn.Module) -> tuple[int, int] | None:
    """(query width, key width) of an attention module: separate projections, or GPT-2's fused
    ``c_attn`` (a ``Conv1D`` producing query, key and value side by side)."""
    qkv = _qkv(m)
    if qkv is not None:
        return qkv[0].out_features, qkv[1].out_features
    c = getattr(m, "c_attn", None)
    if c is not None and hasattr(c, "nf") and hasattr(m, "split_size"):
        return c.weight.shape[1] // 3, c.weight.shape[1] // 3
    return None


def _qkv(m: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    for names in _QKV:
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
            return tuple(getattr(m, n) for n in names)  # type: ignore[return-value]
    return None


def _head_size(m: nn.Module) -> int:
    return next(int(getattr(m, a)) for a in _HEAD_SIZE if hasattr(m, a))


def _meta_build(model: nn.Module, cfg: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return type(model)(cfg)
    except Exception:  # noqa: BLE001 - a config the class rejects expresses nothing
        return None


def probe_kinds(model: nn.Module) -> dict[str, str | None]:
    """For each kind of group (``heads``, ``mlp``, ``hidden``, ``head_dim``): None when the
    config can express shrinking it uniformly, else why not. Each kind is probed by changing the
    config and building the class on the meta device."""
    cfg = model.config
    attn = _attention_modules(model)
    out: dict[str, str | None] = {
        "head_dim": "the config has one head size for queries, keys and values (and rotary "
        "frequencies, where used, derive from it): a cut inside heads is not expressible",
    }
    cname = type(cfg).__name__
    if not attn:
        out["heads"] = out["hidden"] = f"no attention module with a head size found in {cname}"
    else:
        name, a = attn[0]
        d = _head_size(a)
        heads = _widths(a)[0] // d
        probe = copy.deepcopy(cfg)
        probe.head_dim = d
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        step = heads // kv if heads // kv < heads else 1
        probe.num_attention_heads = heads - step
        if hasattr(cfg, "num_key_value_heads") and kv < heads:
            probe.num_key_value_heads = kv - 1
        built = _meta_build(model, probe)
        ok = built is not None and _widths(built.get_submodule(name))[0] == (heads - step) * d
        out["heads"] = None if ok else (
            f"{cname} computes the head size as hidden_size ÷ num_attention_heads, so removing "
            "whole heads would change the head size of the rest")  # fmt: skip
        probe = copy.deepcopy(cfg)
        probe.head_dim = d
        probe.hidden_size = cfg.hidden_size - heads
        built = _meta_build(model, probe)
        ok = built is not None and _widths(built.get_submodule(name))[0] == heads * d
        out["hidden"] = None if ok else (
            f"{cname} computes the head size as hidden_size ÷ num_attention_heads, so a narrower "
            "residual stream would change the head size")  # fmt: skip
    key = next((k for k in _MLP_SIZE if hasattr(cfg, k)), None)
    out["mlp"] = None if key else f"{cname} has no intermediate size field ({', '.join(_MLP_SIZE)})"
    out["other"] = (
        f"{cname} has no field for these channels (neither attention heads, the "
        "MLP width nor the residual stream, e.g. a convolutional front end)"
    )
    return out


def group_kind(model: nn.Module, members: list[tuple[str, int]], is_head: bool) -> str:
    """``hidden`` (the residual stream), ``heads``, ``head_dim``, ``mlp`` or ``other`` (channels
    no config field sizes, such as Whisper's convolutional front end) for a coupled group given
    its ``(parameter name, axis)`` members."""
    emb = model.get_input_embeddings()
    emb_names = {n for n, p in model.named_parameters(remove_duplicate=False)
                 if any(p is q for q in emb.parameters())}  # fmt: skip
    if any(n in emb_names and (ax == 1 or not isinstance(emb, nn.Embedding)) for n, ax in members):
        return "hidden"
    attn = [n for n, _ in _attention_modules(model)]
    if any(any(p.startswith(a + ".") for a in attn) for p, _ in members):
        return "heads" if is_head else "head_dim"
    mlp = [n for n, m in model.named_modules() if _mlp_width(m) is not None]
    if any(any(p.startswith(a + ".") for a in mlp) for p, _ in members):
        return "mlp"
    return "other"


def unexpressible(model: nn.Module, groups: list[tuple[int, list[tuple[str, int]], bool]]
                  ) -> tuple[dict[int, str], list[str]]:  # fmt: skip
    """Groups the config cannot express when cut uniformly, with the reason, and report notes
    naming what was left alone. ``groups`` are ``(group id, members, is_head)``."""
    kinds = probe_kinds(model)
    excluded: dict[int, str] = {}
    left: dict[str, str] = {}
    for gid, members, is_head in groups:
        kind = group_kind(model, members, is_head)
        why = kinds.get(kind)
        if why:
            excluded[gid] = f"{kind}: {why}"
            left[kind] = why
    notes = [f"left {kind} unpruned so the config can express the result: {why}"
             for kind, why in left.items()]  # fmt: skip
    return excluded, notes


# -- write-back: module attributes and config ----------------------------------------------------
def update_modules(model: nn.Module) -> None:
    """Set every size attribute a ``transformers`` forward reads from the (already sliced)
    weights. Per module, so layers of different widths each run correctly."""
    from transformers.pytorch_utils import Conv1D

    for m in model.modules():
        if isinstance(m, Conv1D):
            m.nx, m.nf = m.weight.shape
    for _, a in _attention_modules(model):
        d = _head_size(a)
        heads, kv = (w // d for w in _widths(a))
        for attr in ("num_heads", "num_attention_heads", "n_heads"):
            if hasattr(a, attr):
                setattr(a, attr, heads)
        if hasattr(a, "num_key_value_heads"):
            a.num_key_value_heads = kv
        if hasattr(a, "num_key_value_groups"):
            a.num_key_value_groups = heads // max(kv, 1)
        for attr in ("all_head_size", "inner_dim"):  # inner_dim: T5
            if hasattr(a, attr):
                setattr(a, attr, heads * d)
        if hasattr(a, "split_size"):  # GPT-2: c_attn's output splits into three equal parts
            a.split_size = a.embed_dim = heads * d
    for m in model.modules():
        if isinstance(getattr(m, "intermediate_size", None), int) and _mlp_width(m) is not None:
            m.intermediate_size = _mlp_width(m)
    hidden = _hidden_width(model)
    for m in model.modules():
        if hasattr(m, "hidden_size") and isinstance(m.hidden_size, int) and m is not model:
            m.hidden_size = hidden


def _mlp_width(m: nn.Module) -> int | None:
    """The hidden width of an MLP block (its first projection's outputs), None for other modules.
    BERT's block is ``intermediate.dense``; GPT-2's ``mlp.c_fc`` is a Conv1D (in × out)."""
    for name in _MLP_IN:
        lin = getattr(m, name, None)
        if isinstance(lin, nn.Linear):
            return lin.out_features
        if lin is not None and hasattr(lin, "nf"):
            return lin.weight.shape[1]
    if type(m).__name__.endswith("Intermediate") and isinstance(
        getattr(m, "dense", None), nn.Linear
    ):
        return m.dense.out_features
    return None


def _hidden_width(model: nn.Module) -> int:
    """Width of the residual stream: the token embedding's columns, or the output channels of
    a patch embedding's projection (ViT) or of the first convolution (Whisper's ``conv1``, as
    wide as the stream in every Whisper config)."""
    emb = model.get_input_embeddings()
    if isinstance(emb, nn.Embedding):
        return emb.weight.shape[1]
    proj = next(m for m in emb.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))
    return proj.weight.shape[0]


def update_config(model: nn.Module) -> bool:
    """Write the pruned sizes into ``model.config`` where every layer agrees; True when the
    config then rebuilds exactly these parameter shapes (``from_pretrained`` reloads it)."""
    cfg = model.config
    sizes = {(*(w // _head_size(a) for w in _widths(a)), _head_size(a))
             for _, a in _attention_modules(model)}  # fmt: skip
    if len(sizes) == 1:
        heads, kv, d = sizes.pop()
        cfg.num_attention_heads = heads
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = kv
        if hasattr(cfg, "head_dim") or heads * d != cfg.hidden_size:
            cfg.head_dim = d
    mlp = {w for _, m in model.named_modules() if (w := _mlp_width(m)) is not None}
    key = next((k for k in _MLP_SIZE if hasattr(cfg, k)), None)
    if len(mlp) == 1 and key:
        setattr(cfg, key, mlp.pop())
    cfg.hidden_size = _hidden_width(model)
    return rebuilds(model)


def rebuilds(model: nn.Module) -> bool:
    """Whether ``type(model)(model.config)`` has exactly ``model``'s parameter and buffer shapes."""
    built = _meta_build(model, model.config)
    if built is None:
        return False
    want = {k: tuple(v.shape) for k, v in _tensors(model).items()}
    got = {k: tuple(v.shape) for k, v in _tensors(built).items()}
    return want == got


# -- save / load for what the config cannot express -----------------------------------------------
def _int_attrs(model: nn.Module) -> dict[str, dict[str, int]]:
    names = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups",
             "head_dim", "attention_head_size", "all_head_size", "split_size", "embed_dim",
             "intermediate_size", "hidden_size", "nf", "nx", "in_features", "out_features",
             "normalized_shape", "num_embeddings", "embedding_dim")  # fmt: skip
    out: dict[str, dict[str, int]] = {}
    for n, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in names if isinstance(getattr(m, a, None), (int, tuple))}
        if n and attrs:
            out[n] = {a: list(v) if isinstance(v, tuple) else v for a, v in attrs.items()}
    return out


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, non-persistent buffers (rotary ``inv_freq``, which
    pruning may have sliced) included, tied weights under each of their names."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def save_pruned(model: nn.Module, path: str | os.PathLike, original_config: Any,
                extra: dict | None = None) -> None:  # fmt: skip
    """Write ``model`` (per-layer widths the config cannot express) to ``path``: safetensors
    weights, the original config and ``graphprune_plan.json`` (every tensor's shape, every
    module's size attributes and ``extra``: the removal plan). Rebuilt by :func:`load_pruned`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    original_config.save_pretrained(path)
    tensors = _tensors(model)
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    state = {}
    for k, v in tensors.items():  # safetensors refuses shared storage: keep one, record ties
        if id(v) in first:
            tied[k] = first[id(v)]
        else:
            first[id(v)] = k
            state[k] = v.detach().contiguous().clone()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    plan = {"format": 1, "class": type(model).__name__, "module": type(model).__module__,
            "params": sorted(dict(model.named_parameters(remove_duplicate=False))),
            "attrs": _int_attrs(model), "tied": tied, **(extra or {})}  # fmt: skip
    with open(os.path.join(path, PLAN_FILE), "w") as f:
        json.dump(plan, f, indent=1, sort_keys=True)


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_pruned` (see :func:`graphprune.from_pretrained`)."""
    import importlib

    from safetensors.torch import load_file
    from transformers import AutoConfig

    plan_path = os.path.join(path, PLAN_FILE)
    if not os.path.exists(plan_path):
        raise ConfigError(
            f"{os.fspath(path)!r} has no {PLAN_FILE}: it was not written by "
            "PruneResult.save_pretrained; load it with transformers' from_pretrained"
        )
    with open(plan_path) as f:
        plan = json.load(f)
    if plan.get("format") != 1:
        raise ConfigError(f"{plan_path}: unknown format {plan.get('format')!r} (this graphprune "
                          "reads format 1)")  # fmt: skip
    # The class is named by a file: import only from transformers, and only a model class.
    from transformers import PreTrainedModel

    mod = str(plan.get("module", ""))
    cls = getattr(importlib.import_module(mod), str(plan.get("class")), None) if (
        mod.startswith("transformers.")) else None  # fmt: skip
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ConfigError(
            f"{plan_path}: {mod}.{plan.get('class')} is not a transformers model "
            "class; graphprune.from_pretrained rebuilds transformers models only"
        )
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = cls(cfg)
    state = load_file(os.path.join(path, "model.safetensors"))
    for k, src in plan["tied"].items():
        state[k] = state[src]
    params = set(plan["params"])
    for name, t in state.items():
        *mod, leaf = name.split(".")
        owner = model.get_submodule(".".join(mod))
        if name in params:
            p = state.get(plan["tied"].get(name, name))
            setattr(owner, leaf, p if isinstance(p, nn.Parameter) else nn.Parameter(p))
            state[plan["tied"].get(name, name)] = getattr(owner, leaf)
        else:
            owner._buffers[leaf] = t
    for name, attrs in plan["attrs"].items():
        m = model.get_submodule(name)
        for a, v in attrs.items():
            setattr(m, a, tuple(v) if isinstance(v, list) else v)
    left = [n for n, t in _tensors(model).items() if t.is_meta]
    if left:
        raise ConfigError(f"{os.fspath(path)!r}: no saved tensor for {left[:5]}")
    return model.eval()


# -- depth: whole decoder layers ------------------------------------------------------------------
def drop_layers(model: nn.Module, dropped: list[set[str]], reference: nn.Module, args: tuple,
                kwargs: dict) -> nn.Module | None:  # fmt: skip
    """A copy of ``model`` without the layers whose parameters make up each set in ``dropped``
    (a layer of a numbered ``nn.ModuleList``), with ``layer_idx`` renumbered (KV-cache slots)
    and ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) in the config. None
    when a set is not one whole layer or the result differs from ``reference`` on the inputs."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    drop: dict[str, set[int]] = {}
    for params in dropped:
        hit = None
        for path, lst in lists:
            for i, layer in enumerate(lst):
                names = {f"{path}.{i}.{n}" for n, _ in layer.named_parameters()}
                if names and names <= set(params):
                    hit = (path, i)
        if hit is None:
            return None
        drop.setdefault(hit[0], set()).add(hit[1])
    if len(drop) != 1:
        return None
    path, gone = next(iter(drop.items()))
    out = copy.deepcopy(model)
    lst = out.get_submodule(path)
    kept = [i for i in range(len(lst)) if i not in gone]
    *parent, leaf = path.split(".")
    setattr(out.get_submodule(".".join(parent)), leaf, nn.ModuleList(lst[i] for i in kept))
    for new, layer in enumerate(out.get_submodule(path)):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    cfg = out.config
    n_old = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(kept)
    for key, val in list(vars(cfg).items()):  # per-layer lists (Qwen2's layer_types)
        if isinstance(val, list) and len(val) == n_old and key != "architectures":
            setattr(cfg, key, [val[i] for i in kept])
    with torch.no_grad(), capture_mode(out):
        from graphprune.frontends.torch.outputs import flatten_outputs

        got, want = (
            flatten_outputs(out(*args, **kwargs)),
            flatten_outputs(reference(*args, **kwargs)),
        )
    same = len(got) == len(want) and all(a.shape == b.shape and torch.allclose(a, b, atol=1e-5,
                                                                              rtol=1e-4)
                                         for a, b in zip(got, want))  # fmt: skip
    return out.eval() if same and rebuilds(out) else None
