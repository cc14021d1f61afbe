"""``gp.sparsify_checkpoint``: sparsify a Hugging Face safetensors checkpoint larger than memory.

The model is never whole in memory. Its skeleton is built from ``config.json`` with parameters
on the meta device; the weights outside the decoder layers (embeddings, final norm, head) are
loaded once to turn the calibration batches into the inputs of layer 0, then freed. Each decoder
layer is then loaded from the memory-mapped shards, calibrated on the activations the layers
before it produced (already sparsified), pruned with the same pass as :func:`gp.sparsify`
(:func:`graphprune.passes.sparsity.sparsify.compute_masks` on that one layer), re-run to produce
the next layer's inputs, written to its own output shard and freed. Peak memory is about one
layer's weights and their scores, the calibration activations (offloaded to memory-mapped files
past ``offload_bytes``) and the embedding matrix during the first step.

Masks and weights are those of ``gp.sparsify(model, calib=..., method=..., inplace=True)`` on the
same model: the calibration statistics, criteria and sequential walk are the same code
(:class:`~graphprune.passes.sparsity.calibration.SequentialBlocks`), only where the weights
live differs. The decoder layers' Linear layers are sparsified; embeddings, the final norm and
the output head are copied unchanged (``gp.sparsify`` leaves the head dense by default too).

The output is written into a hidden staging folder beside ``dst`` and renamed into place when
every shard, the index and the side files (config, tokenizer) are written, so a failed or
interrupted run leaves no partial checkpoint. Free space for the output is checked first.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graphprune.frontends.torch import checkpoint as ckpt
from graphprune.frontends.torch.outputs import flatten_outputs
from graphprune.ir.errors import ArtifactError, ConfigError
from graphprune.passes.sparsity.calibration import BlocksDoNotChain, SequentialBlocks
from graphprune.passes.sparsity.config import validate_config, validate_exclude
from graphprune.passes.sparsity.report import SparsityReport
from graphprune.passes.sparsity.sparsify import compute_masks
from graphprune.passes.sparsity.targets import find_blocks, find_targets
from graphprune.staging import make_staging_dir

__all__ = ["CheckpointResult", "sparsify_checkpoint"]

STREAMED_METHODS = ("wanda", "sparsegpt", "obd", "magnitude")


@dataclass
class CheckpointResult:
    """What :func:`sparsify_checkpoint` returns: the output folder and the sparsity report.
    ``masks`` (bool keep-masks by parameter name) only with ``return_masks=True``."""

    path: Path
    report: SparsityReport
    masks: dict[str, torch.Tensor] | None = None


def sparsify_checkpoint(src, dst, calib, sparsity=None, pattern="unstructured", method="wanda",
                        exclude=None, blocksize=128, percdamp=0.01, refine=None, update=None, *,
                        offload_bytes: int = 1 << 30, keep_free: int = 64 << 20,
                        return_masks: bool = False, progress=None) -> CheckpointResult:
    """Sparsify the decoder layers of a safetensors checkpoint on disk, one layer at a time.

    Parameters
    ----------
    src : path
        A folder written by ``save_pretrained`` (``config.json`` and ``model.safetensors`` or
        shards with ``model.safetensors.index.json``) of a causal LM whose decoder layers are an
        ``nn.ModuleList`` (Llama, Mistral, Qwen2, ...).
    dst : path
        Output folder; must not exist. It receives safetensors shards (one per decoder layer and
        one for the rest), the index and ``src``'s other files, and loads with
        ``from_pretrained``.
    calib : list of batches
        Model inputs (token-id tensors or dicts such as a tokenizer's output; padded positions
        are left out of the statistics), as for :func:`graphprune.sparsify`.
    sparsity, pattern, method, exclude, blocksize, percdamp, refine, update
        As :func:`graphprune.sparsify` (``scope='layer'``). ``method`` is one of
        ``wanda``, ``sparsegpt``, ``obd``, ``magnitude``; ``exclude`` names or globs of layers
        to leave dense (the head is never sparsified here).
    offload_bytes : int
        When the activations kept between layers exceed this, they go to memory-mapped files
        in the staging folder (default 1 GiB).
    keep_free : int
        Bytes that must stay free on ``dst``'s filesystem beyond the output's size (checked
        before anything is read; the output is as large as ``src``'s shards).
    return_masks : bool
        Also return every mask (as many bools as the model has sparsified weights: for small
        models and tests).
    progress : callable(str), optional
        Called with one line per layer done.

    Returns
    -------
    CheckpointResult(path, report, masks)

    Examples
    --------
    >>> res = gp.sparsify_checkpoint("llama-7b", "llama-7b-wanda50", calib=[ids],
    ...                              method="wanda", sparsity=0.5)  # doctest: +SKIP
    >>> LlamaForCausalLM.from_pretrained(res.path)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if method not in STREAMED_METHODS:
        raise ConfigError(f"method={method!r}: sparsify_checkpoint streams layer-local criteria "
                          f"({', '.join(STREAMED_METHODS)}); load the model and use gp.sparsify "
                          "for the others")
    cfg, calib = validate_config(sparsity=sparsity, pattern=pattern, method=method,
                                 blocksize=blocksize, percdamp=percdamp, calib=calib,
                                 refine=refine, update=update)
    exclude = validate_exclude(exclude) or []
    if calib is None:
        raise ConfigError("sparsify_checkpoint needs calib=[batch, ...]: the calibration inputs "
                          "are what is streamed through the layers")
    reader, model, bname, blist = open_checkpoint(src, dst, keep_free)

    report = SparsityReport(cfg.method, str(cfg.pattern), "layer", cfg.sparsity,
                            f"streamed from {src.name}, sequential over {bname} "
                            f"({len(blist)} blocks)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = make_staging_dir(dst)
    masks: dict[str, torch.Tensor] | None = {} if return_masks else None
    try:
        writer = ckpt.ShardWriter(stage, len(blist) + 1)
        seq = first_inputs(model, reader, bname, blist, calib)
        offload = _Offload(stage, offload_bytes)
        try:
            for i, block in enumerate(blist):
                prefix = f"{bname}.{i}."
                if i > 0:
                    reader.load_into(block, prefix)
                found = _sparsify_block(block, prefix, seq.cached, seq.masks, cfg, exclude)
                _merge(report, found.report)
                if masks is not None:
                    masks.update(found.masks)
                if i + 1 < len(blist):
                    _with_masks(block, prefix, found.masks, lambda i=i: seq.advance(i))
                    offload.maybe(seq)
                else:
                    _write_masks(block, prefix, found.masks)
                writer.write(_stored(block, prefix, reader))
                ckpt.free_module(block)
                if progress is not None:
                    progress(f"{bname}.{i}: {len(found.masks)} layers sparsified "
                             f"({time.perf_counter() - t0:.0f} s)")
        finally:
            offload.close()
        rest = [n for n in reader.weight_map if not n.startswith(f"{bname}.")]
        writer.write(reader.read(rest))
        writer.finish()
        ckpt.copy_side_files(src, stage)
        os.replace(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    return CheckpointResult(dst, report, masks)


# -- steps (open_checkpoint, first_inputs and OneBlock also serve prune_checkpoint) --


def open_checkpoint(src: Path, dst: Path, keep_free: int
                    ) -> tuple[ckpt.CheckpointReader, nn.Module, str, nn.ModuleList]:  # fmt: skip
    """Check the folders and the free disk, then open ``src``: its shard reader, the model's
    meta-device skeleton and its decoder layers (name and list)."""
    if not src.is_dir():
        raise ArtifactError(f"src={str(src)!r} is not a directory: pass the folder "
                            "save_pretrained wrote")
    if dst.exists() or dst.is_symlink():
        raise ArtifactError(f"dst={str(dst)!r} exists: choose a new folder (nothing is replaced)")
    reader = ckpt.CheckpointReader(src)
    check_disk(reader, dst, keep_free)
    model = ckpt.build_skeleton(src)
    bname, blist = decoder_layers(model, src, reader)
    return reader, model, bname, blist

def check_disk(reader: ckpt.CheckpointReader, dst: Path, keep_free: int) -> None:
    need = reader.nbytes() + keep_free
    free = ckpt.stat_free(dst.parent)
    if free < need:
        gib = 1 << 30
        raise ArtifactError(
            f"not enough disk space for the output: it needs about {need / gib:.1f} GiB (the "
            f"size of {reader.src} plus keep_free) on the filesystem of {dst.parent}, which has "
            f"{free / gib:.1f} GiB free; free space or choose another dst")


def decoder_layers(model: nn.Module, src: Path,
                   reader: ckpt.CheckpointReader) -> tuple[str, nn.ModuleList]:
    found = find_blocks(model, find_targets(model))
    if found is None:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ConfigError(
            f"{src}: {type(model).__name__} has no decoder stack the streamed checkpoint passes can walk "
            f"(an nn.ModuleList of >= 2 identical blocks holding its Linear layers; found module "
            f"lists {lists[:4]}); supported: Llama, Mistral, Qwen2 and other decoders laid out "
            "as embeddings -> layers[i] -> norm -> head")
    bname, blist = found
    if f"{bname}.0.{next(iter(blist[0].state_dict()))}" not in reader.weight_map:
        raise ConfigError(
            f"{src}: the checkpoint's tensor names ({next(iter(reader.weight_map))!r}, ...) do not "
            f"follow {type(model).__name__}'s ({bname}.0...): it was not saved from the causal "
            "LM class config.json names; re-save it with that class's save_pretrained")
    return found


def first_inputs(model: nn.Module, reader: ckpt.CheckpointReader, bname: str,
                 blist: nn.ModuleList, calib: list) -> SequentialBlocks:
    """Load everything but the layers (and layer 0), capture layer 0's inputs, free the rest."""
    tied = dict(getattr(model, "_tied_weights_keys", None) or {})
    if not isinstance(tied, dict):
        tied = {}
    holders = []
    for name, module in model.named_modules():
        if name == bname:
            continue
        direct = {k: p for k, p in module._parameters.items() if p is not None}
        if direct and not name.startswith(f"{bname}."):
            holders.append((name, module))
    for name, module in holders:
        _load_direct(reader, module, f"{name}." if name else "", tied)
    reader.load_into(blist[0], f"{bname}.0.")
    try:
        seq = SequentialBlocks(model, blist, calib)
    except BlocksDoNotChain as e:
        raise ConfigError(f"{bname}: its blocks do not chain ({e}); the streamed passes need "
                          "each layer's output to be the next layer's input") from e
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ConfigError(f"calib: the model failed to run on the first batch up to {bname}.0 "
                          f"({type(e).__name__}: {e}); pass model inputs (token ids or a "
                          "tokenizer's dict)") from e
    for _, module in holders:
        for k, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=False)
    return seq


def _load_direct(reader: ckpt.CheckpointReader, module: nn.Module, prefix: str,
                 tied: dict[str, str]) -> None:
    """Load ``module``'s own parameters (not its children's)."""
    names = [k for k, p in module._parameters.items() if p is not None]
    state = {}
    for k in names:
        full = prefix + k
        source = full if full in reader.weight_map else tied.get(full, full)
        state[k] = reader.read([source])[source]
    for k, t in state.items():
        module._parameters[k] = nn.Parameter(t, requires_grad=False)


class OneBlock(nn.Module):
    """One decoder layer at its path in the full model, called with the inputs captured for it,
    so the pass names (and ``exclude`` matches) the full model's parameter names."""

    def __init__(self, prefix: str, block: nn.Module):
        super().__init__()
        parts = prefix.rstrip(".").split(".")
        holder: nn.Module = self
        for p in parts[:-1]:
            child = nn.Module()
            holder.add_module(p, child)
            holder = child
        holder.add_module(parts[-1], block)
        self.block = [block]  # not a submodule: the forward's handle on it

    def forward(self, block_inputs, attention_mask=None):
        args, kwargs = block_inputs
        return self.block[0](*args, **kwargs)


def _sparsify_block(block, prefix, cached, token_masks, cfg, exclude):
    # ``attention_mask`` here is the 2-D real-token mask the sequential walk keeps per batch, so
    # the statistics leave out padded positions exactly as in the in-memory walk.
    batches = [{"block_inputs": c} if m is None else {"block_inputs": c, "attention_mask": m}
               for c, m in zip(cached, token_masks)]
    found = compute_masks(OneBlock(prefix, block), cfg, calib=batches, exclude=exclude,
                          flatten_outputs=flatten_outputs, inplace=True)
    # Notes about unused exclude patterns and the missing block list concern this one block.
    found.report.notes = [n for n in found.report.notes
                          if "matched no prunable layer" not in n and "no block list" not in n]
    return found


def _with_masks(block, prefix, masks, run) -> None:
    """Write the masks into ``block`` (its weights are written out like that) and run."""
    _write_masks(block, prefix, masks)
    run()


def _write_masks(block: nn.Module, prefix: str, masks: dict[str, torch.Tensor]) -> None:
    params = dict(block.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            w = params[name[len(prefix):]]
            w.mul_(keep.to(w.dtype))


def _stored(block: nn.Module, prefix: str, reader: ckpt.CheckpointReader) -> dict:
    """The block's tensors under the names the source checkpoint stores."""
    state = {prefix + k: v for k, v in block.state_dict().items()}
    theirs = [n for n in reader.weight_map if n.startswith(prefix)]
    extra = sorted(set(theirs) - set(state))
    if extra:
        raise ArtifactError(f"{reader.src}: tensors {extra[:3]} are not parameters of the model "
                            "config.json builds; the weights do not match the config")
    return {n: state[n] for n in theirs}


def _merge(report: SparsityReport, part: SparsityReport) -> None:
    report.layers.extend(part.layers)
    report.excluded.update(part.excluded)
    report.notes.extend(n for n in part.notes if n not in report.notes)


class _Offload:
    """Keeps the activations between layers in memory-mapped files once they exceed a size.

    The files go in a folder inside the staging folder: removed before the rename, and with it
    (as a stale staging entry) when a killed run left it."""

    def __init__(self, stage: Path, limit: int):
        self.stage, self.limit = stage, limit
        self.folder: Path | None = None
        self.count = 0

    def maybe(self, seq: SequentialBlocks) -> None:
        hidden = [_hidden_of(a, k) for a, k in seq.cached]
        if sum(h.numel() * h.element_size() for h in hidden) <= self.limit:
            return
        if self.folder is None:
            self.folder = self.stage / ".activations"
            self.folder.mkdir()
        out = []
        for (args, kwargs), h in zip(seq.cached, hidden):
            self.count += 1
            path = self.folder / f"{self.count}.pt"
            torch.save(h, path)
            stored = torch.load(path, mmap=True, weights_only=True)
            os.unlink(path)  # the mapping stays valid; the file goes when it is dropped
            if args and args[0] is h:
                out.append(((stored, *args[1:]), kwargs))
            else:
                out.append((args, {**kwargs, "hidden_states": stored}))
        seq.cached = out

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _hidden_of(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]
