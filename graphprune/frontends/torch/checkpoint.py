"""Hugging Face safetensors checkpoints read and written one module at a time.

For models whose weights do not fit in memory
(:func:`graphprune.api.checkpoint.sparsify_checkpoint`):

- :func:`build_skeleton` builds the model from its ``config.json`` with every *parameter* on the
  meta device (no memory, no random init) and every *buffer* real (rotary ``inv_freq`` and the
  like are computed in ``__init__`` and are not in the checkpoint), as accelerate's
  ``init_empty_weights`` does; accelerate is not a dependency, so the few lines are here.
- :class:`CheckpointReader` maps tensor names to shard files (``model.safetensors.index.json``
  or a single ``model.safetensors``) and :meth:`~CheckpointReader.load_into` fills one module's
  parameters from them. Each call opens the shards it needs with ``safetensors.safe_open``
  (memory-mapped) and closes them again: pages of a mapping still open count in the process's
  resident set, so a shard held open for the whole run would grow it towards the checkpoint's
  size. :func:`free_module` puts a module's parameters back on the meta device.
- :class:`ShardWriter` writes tensors as numbered shards plus the index into a folder (the
  caller's staging folder, renamed into place when everything is written).

Runs in the torch frontend; ``transformers`` and ``safetensors`` are imported here only.
Errors: a missing or unreadable shard or tensor is an :class:`ArtifactError` naming the file or
tensor; a config ``transformers`` cannot build as a causal LM is a :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from graphprune.ir.errors import ArtifactError, ConfigError

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointReader",
    "ShardWriter",
    "build_skeleton",
    "copy_side_files",
    "free_module",
    "stat_free",
]  # fmt: skip

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(src: Path) -> nn.Module:
    """The causal LM of ``src/config.json``, parameters on the meta device, in eval mode."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{src}: cannot read a transformers config ({type(e).__name__}: {e}); "
                          "pass a directory saved with save_pretrained") from e
    arch = list(getattr(config, "architectures", None) or [])
    if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        raise ConfigError(
            f"{src}: a {config.model_type!r} checkpoint of {arch}, not a causal language model; "
            "sparsify_checkpoint streams decoder stacks saved as *ForCausalLM (Llama, Mistral, "
            "Qwen2, Phi-3, ...): load other models and use gp.sparsify")
    # Calibration runs each batch once per layer: a KV cache would keep every layer's keys and
    # values (and a second run of a layer would attend to the first run's).
    config.use_cache = False
    try:
        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ConfigError(
            f"{src}: model_type {config.model_type!r} (architectures {arch}) is not a causal "
            "language model transformers can build (AutoModelForCausalLM); sparsify_checkpoint "
            "streams decoder stacks such as Llama, Mistral, Qwen2 and Phi-3") from e
    return model.eval()


def free_module(module: nn.Module) -> None:
    """Put ``module``'s parameters back on the meta device (their memory is released)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)


class CheckpointReader:
    """Tensor name → shard of a safetensors checkpoint folder; every shard checked up front."""

    def __init__(self, src: Path):
        self.src = src
        index = src / INDEX_FILE
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ArtifactError(f"{index}: not a safetensors index ({e}); re-save the "
                                    "checkpoint with save_pretrained") from e
        elif (src / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with self._open(SINGLE_FILE, safe_open) as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}  # noqa: SIM118
        else:
            found = sorted(p.name for p in src.iterdir())[:8] if src.is_dir() else []
            raise ArtifactError(f"{src}: no {INDEX_FILE} nor {SINGLE_FILE} (found {found}); "
                                "sparsify_checkpoint reads safetensors checkpoints (save the "
                                "model with save_pretrained(..., safe_serialization=True))")
        missing: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            if not (src / shard).is_file():
                missing.setdefault(shard, []).append(name)
        if missing:
            shard, names = next(iter(missing.items()))
            raise ArtifactError(f"{src}: {len(missing)} shard(s) listed in {INDEX_FILE} are "
                                f"missing: {sorted(missing)[:4]} ({shard} holds {names[:3]}...); "
                                "copy the complete checkpoint")

    def _open(self, shard: str, safe_open):
        try:
            return safe_open(self.src / shard, framework="pt", device="cpu")
        except Exception as e:
            raise ArtifactError(f"{self.src / shard}: not a readable safetensors file "
                                f"({type(e).__name__}: {e})") from e

    def nbytes(self) -> int:
        """Bytes of all shard files (the size of an output of the same dtypes)."""
        return sum((self.src / s).stat().st_size for s in set(self.weight_map.values()))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read from their shards (each opened and closed here)."""
        from safetensors import safe_open

        absent = [n for n in names if n not in self.weight_map]
        if absent:
            raise ArtifactError(f"{self.src}: the checkpoint has no tensor {absent[0]!r} "
                                f"({len(absent)} missing) that the model's config implies; "
                                "the weights do not match config.json")
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, group in by_shard.items():
            with self._open(shard, safe_open) as f:
                for n in group:
                    out[n] = f.get_tensor(n)
        return out

    def load_into(self, module: nn.Module, prefix: str, tied: dict[str, str] | None = None) -> None:
        """Fill ``module``'s parameters from the tensors named ``prefix + name``.

        ``tied`` maps a parameter missing from the checkpoint to the one it shares (a tied
        ``lm_head.weight``); such a parameter takes that tensor.
        """
        tied = tied or {}
        wanted = [n for n, p in module.named_parameters(remove_duplicate=False)
                  if p.device.type == "meta"]
        stored = {n: prefix + n for n in wanted if prefix + n in self.weight_map}
        tensors = self.read(list(dict.fromkeys(stored.values())))
        state = {n: tensors[full] for n, full in stored.items()}
        for n in wanted:
            if n not in state:
                source = tied.get(prefix + n)
                if source is None or source not in self.weight_map:
                    self.read([prefix + n])  # raises the missing-tensor error
                rel = source[len(prefix):] if source.startswith(prefix) else None
                state[n] = state[rel] if rel in state else self.read([source])[source]
        try:
            module.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            raise ArtifactError(f"{self.src}: tensors under {prefix!r} do not fit the model "
                                f"config.json describes ({e})") from e
        for p in module.parameters():
            p.requires_grad_(False)


class ShardWriter:
    """Numbered safetensors shards and ``model.safetensors.index.json`` in ``folder``."""

    def __init__(self, folder: Path, total: int):
        self.folder, self.total = folder, total
        self.count = 0
        self.weight_map: dict[str, str] = {}
        self.size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> str:
        """Write one shard (the next number) and return its file name."""
        from safetensors.torch import save_file

        self.count += 1
        if self.count > self.total:
            raise AssertionError(f"more shards than the {self.total} announced")
        name = f"model-{self.count:05d}-of-{self.total:05d}.safetensors"
        contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
        try:
            save_file(contiguous, self.folder / name, metadata={"format": "pt"})
        except OSError as e:
            raise ArtifactError(f"writing {self.folder / name} failed: {e}") from e
        for k, v in contiguous.items():
            self.weight_map[k] = name
            self.size += v.numel() * v.element_size()
        return name

    def finish(self) -> None:
        """Write the index (after every shard)."""
        if self.count != self.total:
            raise AssertionError(f"{self.count} shards written, {self.total} announced")
        index = {"metadata": {"total_size": self.size}, "weight_map": dict(sorted(
            self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the checkpoint's other files (config, generation config, tokenizer) to ``dst``."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not (p.suffix in (".safetensors", ".bin", ".pt", ".pth")
                                or p.name == INDEX_FILE or p.name.startswith(".")):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def stat_free(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (its nearest existing ancestor)."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free

