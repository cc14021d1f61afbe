"""Larger than memory: ``gp.sparsify_checkpoint`` (Wanda 50%) on a Llama checkpoint on disk.

The checkpoint is built here from random weights, in fp32, and written shard by shard (one
decoder layer's tensors at a time, one shard each, plus one for embeddings/norm/head): the full
model is never in memory, here or in the measured process. Shapes: ``7b`` (Llama-2-7B: hidden
4096, intermediate 11008, 32 layers, 32 heads, vocab 32000; 25.1 GiB) and ``1b`` (TinyLlama-1.1B:
hidden 2048, intermediate 5632, 22 layers, 4 kv heads; 4.1 GiB).

The streamed sparsification runs in a subprocess: imports and calibration data first, then the
baseline (``VmRSS``), then ``gp.sparsify_checkpoint``; the figures are the process's peak RSS
(``VmHWM``, issue 17's goal for 7B: <= 8 GiB) and the time. Then, in this process, the output is
checked: layers 0 and 1 must equal (exactly) ``gp.sparsify(..., inplace=True)`` run in memory on
a 2-layer model holding the source checkpoint's embedding, layers 0-1, norm and head (the same
calibration walk up to layer 1), and every row of every Linear of the last layer must be 50%
zeros. Both checkpoints are deleted afterwards (``--keep`` keeps them). Usage::

    .venv/bin/python benchmarks/bench_scale.py --shape 1b [--dir /work/tmp-scale] [--keep]
        [--n-seq 8] [--seq-len 256] [--no-write]

Refuses to start when the folder's filesystem has less free space than both checkpoints need
(7B: 60 GB). Writes its row between ``<!-- bench_scale:start -->`` and ``end`` in
``BENCHMARKS.md`` (rows of other shapes are kept) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from graphprune.staging import existing_ancestor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record

START, END = "<!-- bench_scale:start -->", "<!-- bench_scale:end -->"
GIB = 2**30
SHAPES = {
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
           "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4},
    "7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
}
HEAD = ["shape", "params", "checkpoint GiB", "calibration", "baseline RSS GiB", "peak RSS GiB",
        "peak above baseline GiB", "seconds", "build s", "check", "machine", "date",
        "load average (before, after)"]


def _config(shape: str):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, use_cache=False,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _layer_tensors(cfg, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    p = f"model.layers.{i}."
    out = {p + k + ".weight": torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(h)
    out[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return out


def build_checkpoint(shape: str, path: Path) -> tuple[int, int]:
    """Write the checkpoint one layer at a time; return (parameters, bytes)."""
    from safetensors.torch import save_file

    cfg = _config(shape)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    n = cfg.num_hidden_layers + 1
    weight_map, size, params = {}, 0, 0
    for i in range(n):
        if i < cfg.num_hidden_layers:
            tensors = _layer_tensors(cfg, i, gen)
        else:
            v, h = cfg.vocab_size, cfg.hidden_size
            tensors = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen) * 0.02,
                       "model.norm.weight": torch.ones(h),
                       "lm_head.weight": torch.randn(v, h, generator=gen) * 0.02}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            size += t.numel() * 4
            params += t.numel()
        del tensors
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params, size


def _calib(cfg, n_seq: int, seq_len: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g) for _ in range(n_seq)]


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(args) -> None:
    import graphprune as gp

    calib = _calib(_config(args.shape), args.n_seq, args.seq_len)
    base = _status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    res = gp.sparsify_checkpoint(args.src, args.dst, calib, method="wanda", sparsity=0.5,
                                 progress=lambda s: print(s, file=sys.stderr, flush=True))
    dt = time.perf_counter() - t0
    print(json.dumps({"baseline": base, "hwm": _status_gib("VmHWM"), "seconds": dt,
                      "sparsity": res.report.total_sparsity}))


def _read(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for n in names:
        with safe_open(path / index[n], framework="pt") as f:
            out[n] = f.get_tensor(n)
    return out


def check(shape: str, src: Path, dst: Path, n_seq: int, seq_len: int) -> str:
    """Layers 0-1 equal the in-memory path on a 2-layer model; the last layer's rows are 50%."""
    from transformers import LlamaForCausalLM

    import graphprune as gp

    cfg = _config(shape)
    last = cfg.num_hidden_layers - 1
    cfg.num_hidden_layers = 2
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    names = list(model.state_dict())
    state = _read(src, names)
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # buffers were built on meta
    model.eval()
    ref = gp.sparsify(model, calib=_calib(cfg, n_seq, seq_len), method="wanda", sparsity=0.5,
                      inplace=True)
    ours = _read(dst, [n for n in names if n.startswith("model.layers.")])
    bad = [n for n, t in ours.items() if not torch.equal(t, model.state_dict()[n])]
    if bad:
        raise SystemExit(f"check failed: {bad[:3]} differ from the in-memory path")
    lin = [f"model.layers.{last}.{k}.weight" for k in ("self_attn.q_proj", "self_attn.k_proj",
           "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj")]  # fmt: skip
    for n, w in _read(dst, lin).items():
        zeros = (w == 0).sum(1)
        if not bool((zeros == w.shape[1] // 2).all()):
            raise SystemExit(f"check failed: rows of {n} are not 50% zeros")
    return (f"layers 0-1 equal in-memory ({len(ref.masks)} masks); layer {last}: every row "
            "50% zeros")


def _row_key(row: str) -> str:
    return row.split("|")[1].strip()


def write(row: list) -> None:
    text = Path(record.PATH).read_text()
    rows = []
    if START in text:
        body = text.split(START, 1)[1].split(END, 1)[0]
        rows = [ln for ln in body.splitlines() if ln.startswith("| ") and not
                ln.startswith("| shape") and _row_key(ln) != row[0]]
    new = "| " + " | ".join(str(c) for c in row) + " |"
    table = "\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD),
                       *sorted(rows + [new], key=_row_key)])
    body = ("\n### Larger than memory: streamed Wanda 50% from a safetensors checkpoint "
            "(issue 17)\n\n"
            "Llama checkpoints in fp32 built from random weights and written shard by shard by "
            "`benchmarks/bench_scale.py` (the full model is never in memory); "
            "`gp.sparsify_checkpoint(src, dst, calib, method='wanda', sparsity=0.5)` in a fresh "
            "process. Peak RSS = VmHWM of that process (reset after imports and calibration "
            "data; goal for 7B: <= 8 GiB). Calibration: random token sequences, one per batch. "
            "Check: layers 0-1 of the output equal `gp.sparsify(..., inplace=True)` in memory "
            "on a 2-layer model of the same weights; the last layer's rows are 50% zeros. "
            "Shared 2-core machine: times are noisy.\n\n" + table + "\n")
    record.write_block(START, END, body)


def checkpoint_bytes(shape: str) -> int:
    """fp32 bytes of the checkpoint :func:`build_checkpoint` writes for ``shape`` (untied head)."""
    cfg = _config(shape)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return 4 * (cfg.num_hidden_layers * (2 * h * h + 2 * kv * h + 3 * h * f) + 2 * v * h)


def require_disk(directory: str, need: int) -> None:
    """Stop before writing when the filesystem of ``directory`` has less than ``need`` bytes."""
    free = shutil.disk_usage(existing_ancestor(Path(directory) / "x")[0]).free
    if free < need:
        raise SystemExit(f"refusing: the input and output checkpoints need {need / GIB:.0f} GiB "
                         f"on the filesystem of {directory}; it has {free / GIB:.0f} GiB free")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dir", default="/work/tmp-scale")
    ap.add_argument("--n-seq", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    root = Path(args.dir) / args.shape
    if root.exists():
        raise SystemExit(f"{root} exists (a previous run?): remove it first")
    require_disk(args.dir, 2 * checkpoint_bytes(args.shape) + 6 * GIB)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    src, dst = root / "src", root / "out"
    try:
        t0 = time.perf_counter()
        params, size = build_checkpoint(args.shape, src)
        build_s = time.perf_counter() - t0
        print(f"built {src}: {params / 1e9:.2f} B params, {size / GIB:.2f} GiB in {build_s:.0f} s",
              flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape,
               "--src", str(src), "--dst", str(dst), "--n-seq", str(args.n_seq),
               "--seq-len", str(args.seq_len)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the sparsify subprocess failed (exit {proc.returncode})")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        verdict = check(args.shape, src, dst, args.n_seq, args.seq_len)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    row = [args.shape, f"{params / 1e9:.2f} B", f"{size / GIB:.2f}",
           f"{args.n_seq} x {args.seq_len} tokens", f"{got['baseline']:.2f}",
           f"{got['hwm']:.2f}", f"{got['hwm'] - got['baseline']:.2f}", f"{got['seconds']:.0f}",
           f"{build_s:.0f}", verdict, record.cpu_name(), datetime.date.today().isoformat(),
           f"{load0}; {load1}"]
    print(record.md_table(HEAD, [row]))
    if not args.no_write:
        write(row)


if __name__ == "__main__":
    main()
