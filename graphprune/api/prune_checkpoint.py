"""``gp.prune_checkpoint``: structured pruning of a safetensors checkpoint larger than memory.

The uniform-width pruning :func:`graphprune.prune` does for a ``transformers`` model
(``uniform=True``: the same number of MLP channels and of attention heads removed from every
decoder layer, whole kv-head groups under GQA, only what the config can express), without the
model ever being whole in memory. Two streamed passes over the decoder layers:

1. **Score.** One decoder layer is captured once (layer 0, at its path in the full model, on
   inputs made from a dummy batch) into a :class:`~graphprune.ir.PruneGraph`; its coupling
   groups are the template for every layer, since all layers are built from the same config.
   For each layer in turn its weights are read from the memory-mapped shards, put in the
   template graph's weight store, and scored with :func:`graphprune.passes.prune.channels.
   compute_scores` (the criterion code ``gp.prune`` runs); then freed.
2. **Select and write.** The per-layer groups (the template's, under each layer's parameter
   names) and their scores go through :func:`graphprune.passes.prune.channels.select` with
   ``uniform=True`` (the selection ``gp.prune`` runs: every layer loses the same count, each
   layer its own lowest-scored indices, the count ranked across layers under
   ``scope="global"``). Each layer is then read again, sliced by
   :func:`graphprune.passes.prune.plan.plan_removal`'s kept positions, written as its own shard
   into a staging folder and freed. Embeddings, final norm and head are copied unchanged.

The residual width (``hidden_size``) and the size of a head (``head_dim``) are kept: a residual
cut is scored over every layer, the embedding and the head at once and changes RMSNorm
statistics, and the config has one head size. ``config.json`` gets the new
``intermediate_size``, ``num_attention_heads`` and ``num_key_value_heads``, and ``head_dim``
written out (it no longer equals ``hidden_size / num_attention_heads``); the result reloads with
``AutoModelForCausalLM.from_pretrained``. It equals ``gp.prune(model, x, ratio, criterion,
uniform=True, ignore=[<the input embedding>])`` in memory, except where the config class would
refuse the head count selected (``LlamaConfig`` wants ``hidden_size`` to be a multiple of
``num_attention_heads``): then fewer kv-head groups go, and the report says so.

Data-free criteria only (``l1``, ``l2``, ``fpgm``): the activation-based ones need the
layer-sequential calibration of :func:`graphprune.sparsify_checkpoint` run on the pruned layers,
which is not done here (a :class:`ConfigError` says so). Peak memory: one decoder layer's
weights (twice while a layer is sliced), the embedding matrix and head once while layer 0's
inputs are made, and every layer's scores (a few floats per channel).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graphprune.api.checkpoint import OneBlock, first_inputs, open_checkpoint
from graphprune.api.graph import capture
from graphprune.frontends.torch import checkpoint as ckpt
from graphprune.frontends.torch import hf
from graphprune.frontends.torch.arrays import as_numpy
from graphprune.ir.errors import ArtifactError, ConfigError
from graphprune.passes.coupling import Group, Member, build_coupling
from graphprune.passes.prune import channels
from graphprune.passes.prune.plan import plan_removal
from graphprune.staging import make_staging_dir

__all__ = ["CheckpointPruneReport", "PruneCheckpointResult", "prune_checkpoint"]

STREAMED_CRITERIA = ("l1", "l2", "fpgm")
_CONFIG_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass
class CheckpointPruneReport:
    """Sizes before and after (``sizes[key] = (before, after)`` for the config fields changed),
    parameter counts, what was left alone and why, and the time taken."""

    criterion: str
    scope: str
    ratio: float
    layers: int
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    def to_text(self) -> str:
        out = [(f"streamed structured pruning: criterion={self.criterion} scope={self.scope} "
                f"ratio={self.ratio:.3f}, uniform over {self.layers} decoder layers"),
               (f"params {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_ratio:.1%}) in {self.seconds:.0f} s")]
        out += [f"  {k}: {a} -> {b}" for k, (a, b) in self.sizes.items()]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


@dataclass
class PruneCheckpointResult:
    """The output folder, the report and, per pruned group, the indices removed: keyed by the
    group's sorted ``(parameter name, axis)`` members, as ``gp.prune``'s groups can be keyed."""

    path: Path
    report: CheckpointPruneReport
    removed: dict[tuple[tuple[str, int], ...], list[int]]


def prune_checkpoint(src, dst, ratio: float = 0.5, criterion: str = "l2",
                     scope: str = "local", *, min_keep: float = 0.1, round_to: int | None = None,
                     heads: bool = True, keep_free: int = 64 << 20,
                     progress=None) -> PruneCheckpointResult:
    """Remove the same number of MLP channels and attention heads from every decoder layer of a
    safetensors checkpoint on disk, one layer in memory at a time.

    Parameters
    ----------
    src : path
        A folder written by ``save_pretrained`` (``config.json``, ``model.safetensors`` or
        shards with their index) of a causal LM whose decoder layers are an ``nn.ModuleList``
        and whose config has a ``head_dim`` (Llama, Mistral, Qwen2, ...).
    dst : path
        Output folder; must not exist. Receives one shard per decoder layer and one for the
        rest, the index, the updated ``config.json`` and ``src``'s other files.
    ratio, criterion, scope, min_keep, round_to, heads
        As :func:`graphprune.prune` with ``uniform=True``; ``criterion`` is ``l1``, ``l2`` or
        ``fpgm`` (data-free).
    keep_free : int
        Bytes that must stay free on ``dst``'s filesystem beyond ``src``'s size (checked first).
    progress : callable(str), optional
        Called with one line per layer scored and per layer written.

    Returns
    -------
    PruneCheckpointResult(path, report, removed)

    Examples
    --------
    >>> res = gp.prune_checkpoint("llama-7b", "llama-7b-pruned", ratio=0.25)  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(res.path)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if criterion not in STREAMED_CRITERIA:
        raise ConfigError(f"criterion={criterion!r}: prune_checkpoint scores without data "
                          f"({', '.join(STREAMED_CRITERIA)}); for activation-based criteria "
                          "load the model and use gp.prune(..., calib=...)")
    cfg = channels.PruneConfig(ratio, criterion, scope, round_to=round_to, min_keep=min_keep,
                               heads=heads)
    cfg.validate()
    cfg.uniform = True
    reader, model, bname, blist = open_checkpoint(src, dst, keep_free)
    tmpl = _Template.capture(model, reader, bname, blist, cfg)
    report = CheckpointPruneReport(criterion, scope, ratio, len(blist), notes=tmpl.notes)
    say = progress or (lambda _line: None)

    groups, scores = [], {}
    for i in range(len(blist)):
        for g, s in zip(*tmpl.scores(reader, i, cfg)):
            g = replace(g, id=len(groups))
            groups.append(g)
            scores[g.id] = s
        say(f"{bname}.{i}: scored ({time.perf_counter() - t0:.0f} s)")
    removal = channels.select(tmpl.pg, cfg, scores, groups, ratio)
    per_layer = len(tmpl.groups)
    removal = _loadable_heads(model, tmpl, groups, scores, removal, report.notes)
    removed = {_key(groups[gid]): idx for gid, idx in removal.items()}

    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = make_staging_dir(dst)
    try:
        writer = ckpt.ShardWriter(stage, len(blist) + 1)
        for i, block in enumerate(blist):
            mine = {tmpl.groups[gid % per_layer].id: idx for gid, idx in removal.items()
                    if gid // per_layer == i}
            before, after = tmpl.write_layer(reader, writer, i, mine, block)
            report.params_before += before
            report.params_after += after
            say(f"{bname}.{i}: written ({time.perf_counter() - t0:.0f} s)")
        rest = reader.read([n for n in reader.weight_map if not n.startswith(f"{bname}.")])
        kept = sum(t.numel() for t in rest.values())
        report.params_before += kept
        report.params_after += kept
        writer.write(rest)
        del rest
        writer.finish()
        ckpt.copy_side_files(src, stage)
        report.sizes = _write_config(model, src, stage)
        os.replace(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    return PruneCheckpointResult(dst, report, removed)


def _loadable_heads(model: nn.Module, tmpl: _Template, groups: list[Group], scores: dict,
                    removal: dict[int, list[int]], notes: list[str]) -> dict[int, list[int]]:
    """Fewer kv-head groups removed where the config class would refuse the selected count.

    ``transformers``' config classes validate on load (``LlamaConfig``: ``hidden_size`` must be
    a multiple of ``num_attention_heads``, even with ``head_dim`` given), so a count the model
    itself runs with may not reload. The largest loadable count not above the selected one is
    removed instead, in every layer, each layer's lowest-scored kv groups as ``select`` ranks
    them; the report says so."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    d = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    per_layer = len(tmpl.groups)
    mine = [gid for gid in range(len(groups))
            if channels.is_head_group(tmpl.pg, tmpl.groups[gid % per_layer])
            and groups[gid].size == kv]
    counts = {len(removal.get(gid, ())) for gid in mine}
    if len(counts) != 1:
        return removal
    n = counts.pop()
    fit = next(k for k in range(n, -1, -1) if _config_loads(config, heads // kv * (kv - k),
                                                            kv - k, d))
    if fit == n:
        return removal
    out = {gid: idx for gid, idx in removal.items() if gid not in mine}
    for gid in mine:
        if fit:
            out[gid] = sorted(np.argsort(scores[gid], kind="stable")[:fit].tolist())
    notes.append(f"{n} of {kv} kv-head groups per layer were selected, {fit} removed: "
                 f"{type(config).__name__} refuses to load {heads // kv * (kv - n)} attention "
                 f"heads with hidden_size {config.hidden_size}")
    return out


def _config_loads(config, heads: int, kv: int, head_dim: int) -> bool:
    d = config.to_dict()
    d.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    try:
        type(config).from_dict(d)
    except Exception:  # noqa: BLE001 - transformers' validators raise several kinds
        return False
    return True


def _key(g: Group) -> tuple[tuple[str, int], ...]:
    return tuple(sorted({(m.param, m.axis) for m in g.params}))


@dataclass
class _Template:
    """Layer 0 captured once: its graph, the groups that may be cut and the layer's parameter
    names relative to the layer (``self_attn.q_proj.weight``)."""

    pg: object
    groups: list[Group]
    prefix: str
    bname: str
    notes: list[str]

    @classmethod
    def capture(cls, model: nn.Module, reader: ckpt.CheckpointReader, bname: str,
                blist: nn.ModuleList, cfg: channels.PruneConfig) -> _Template:
        """Capture layer 0 and keep the groups ``cfg`` (``heads``) and the config allow."""
        # Capture needs the layer's call arguments (rotary embeddings, masks): made from a dummy
        # batch through the embedding; only their shapes matter for the structure.
        seq = first_inputs(model, reader, bname, blist, [torch.zeros(2, 8, dtype=torch.long)])
        prefix = f"{bname}.0."
        pg = capture(OneBlock(prefix, blist[0]), {"block_inputs": seq.cached[0]},
                     dynamic_shapes=False)
        del seq
        members = [(g.id, [(m.param, m.axis) for m in g.params], channels.is_head_group(pg, g))
                   for g in build_coupling(pg).groups if g.prunable]
        cfg.exclude, notes = hf.unexpressible(model, members)
        groups, _ = channels.candidates(pg, cfg)
        if not groups:
            raise ConfigError(f"{bname}.0 ({type(blist[0]).__name__}): no MLP channels or "
                              "attention heads the config can express as a uniform cut: "
                              + "; ".join(notes or ["every group is frozen"]))
        notes.append("the residual width (hidden_size) is kept: prune_checkpoint cuts MLP "
                     "channels and attention heads")
        ckpt.free_module(blist[0])
        return cls(pg, groups, prefix, bname, notes)

    def _layer_tensors(self, reader: ckpt.CheckpointReader, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors under layer 0's names, checked against the template's."""
        prefix = f"{self.bname}.{i}."
        theirs = {n[len(prefix):] for n in reader.weight_map if n.startswith(prefix)}
        ours = {self.pg.value(p).param[len(self.prefix):] for p in self.pg.params()}
        if theirs != ours:
            odd = sorted(theirs ^ ours)[:3]
            raise ArtifactError(f"{reader.src}: {prefix}* holds other tensors than the model "
                                f"config.json builds ({odd} differ); the weights do not match "
                                "the config")
        got = reader.read([prefix + n for n in sorted(theirs)])
        out = {}
        for p in self.pg.params():
            name = self.pg.value(p).param
            t = got[prefix + name[len(self.prefix):]]
            if tuple(t.shape) != tuple(self.pg.value(p).shape):
                raise ArtifactError(f"{reader.src}: {prefix}{name[len(self.prefix):]} has shape "
                                    f"{tuple(t.shape)}, the config gives "
                                    f"{tuple(self.pg.value(p).shape)}")
            out[name] = t
        return out

    def scores(self, reader: ckpt.CheckpointReader, i: int,
               cfg: channels.PruneConfig) -> tuple[list[Group], list[np.ndarray]]:
        """Layer ``i``'s groups (the template's under its names) and their criterion scores."""
        tensors = self._layer_tensors(reader, i)
        for name, t in tensors.items():
            arr = as_numpy(t).view()
            arr.flags.writeable = False
            self.pg.weights[name] = arr
        found, _ = channels.compute_scores(self.pg, cfg, self.groups)
        self.pg.weights.clear()  # the layer's memory goes with its tensors
        rename = f"{self.bname}.{i}."
        out = [replace(g, members=[Member(m.value, m.axis, None if m.param is None else
                                          rename + m.param[len(self.prefix):], m.block)
                                   for m in g.members]) for g in self.groups]
        return out, [found[g.id] for g in self.groups]

    def write_layer(self, reader: ckpt.CheckpointReader, writer: ckpt.ShardWriter, i: int,
                    removal: dict[int, list[int]], block: nn.Module) -> tuple[int, int]:
        """Slice layer ``i`` by its removal, write it as one shard; (params before, after).

        The skeleton's layer gets meta parameters of the new shapes, from which the config's
        new sizes are read at the end."""
        plan = plan_removal(self.pg, removal)
        tensors = self._layer_tensors(reader, i)
        prefix = f"{self.bname}.{i}."
        out, before, after = {}, 0, 0
        for p in self.pg.params():
            name = self.pg.value(p).param
            t = tensors.pop(name)
            before += t.numel()
            for axis in range(t.dim()):
                kept = plan.kept(p, axis)
                if kept is not None:
                    t = t.index_select(axis, torch.from_numpy(kept))
            after += t.numel()
            rel = name[len(self.prefix):]
            out[prefix + rel] = t
            *path, leaf = rel.split(".")
            owner = block.get_submodule(".".join(path))
            owner._parameters[leaf] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype,
                                                               device="meta"),
                                                   requires_grad=False)
            if isinstance(owner, nn.Linear) and leaf == "weight":
                owner.out_features, owner.in_features = t.shape
        writer.write(out)
        return before, after


def _write_config(model: nn.Module, src: Path, stage: Path) -> dict[str, tuple[int, int]]:
    """The source config.json with the new sizes; ``{field: (before, after)}``. The skeleton's
    layers hold meta parameters of the written shapes: the config must rebuild exactly them."""
    hf.update_modules(model)
    if not hf.update_config(model):
        raise ArtifactError(f"{src}: the pruned layers' shapes cannot be written as a "
                            f"{type(model.config).__name__}: the layers disagree or the class "
                            "derives a size another way; nothing was written")
    config = json.loads((src / "config.json").read_text())
    sizes = {}
    for k in _CONFIG_KEYS:
        new = getattr(model.config, k, None)
        if new is None:
            continue
        old = config.get(k)
        if old is None and k == "head_dim":
            old = config["hidden_size"] // config["num_attention_heads"]
        config[k] = int(new)
        sizes[k] = (old, int(new))
    (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sizes
