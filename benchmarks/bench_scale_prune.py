"""Larger than memory: ``gp.prune_checkpoint`` (uniform structured pruning) on a Llama on disk.

The checkpoint is the one ``bench_scale.py`` builds (random weights, fp32, written one decoder
layer at a time; ``7b``: Llama-2-7B's shape, 25.1 GiB; ``1b``: TinyLlama-1.1B's, 4.1 GiB). The
streamed pruning runs in a subprocess: imports first, then the baseline (``VmRSS``), then
``gp.prune_checkpoint(src, dst, ratio, criterion='l2')``; the figures are its peak RSS
(``VmHWM``) and time. Then, in this process, the output is checked:

- ``config.json`` rebuilds every tensor shape of the output index (a meta-device model built
  from it by ``AutoModelForCausalLM.from_config``), so ``from_pretrained`` loads it;
- layers 0 and 1 equal (exactly) ``gp.prune(model, x, ratio, criterion='l2', uniform=True,
  ignore=['model.embed_tokens'])`` in memory on a 2-layer model holding the source's embedding,
  layers 0-1, norm and head (local scope: each layer's own lowest-scored channels, the same
  count in every layer, so the 2-layer selection is the 32-layer one);
- that 2-layer slice of the output, loaded with plain ``from_pretrained``, gives the in-memory
  pruned model's logits within 1e-4.

Both checkpoints are deleted afterwards (``--keep`` keeps them). Usage::

    .venv/bin/python benchmarks/bench_scale_prune.py --shape 7b [--ratio 0.5] [--dir ...]

Refuses to start without room for both checkpoints. Writes its row between
``<!-- bench_scale_prune:start -->`` and ``end`` in ``BENCHMARKS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale
import record

START, END = "<!-- bench_scale_prune:start -->", "<!-- bench_scale_prune:end -->"
GIB = 2**30
HEAD = ["shape", "params before -> after", "checkpoint GiB before -> after", "ratio",
        "sizes", "baseline RSS GiB", "peak RSS GiB", "peak above baseline GiB", "seconds",
        "build s", "check", "machine", "date", "load average (before, after)"]


def _child(args) -> None:
    import graphprune as gp

    base = bench_scale._status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    res = gp.prune_checkpoint(args.src, args.dst, ratio=args.ratio, criterion="l2",
                              progress=lambda s: print(s, file=sys.stderr, flush=True))
    dt = time.perf_counter() - t0
    print(res.report.to_text(), file=sys.stderr)
    print(json.dumps({"baseline": base, "hwm": bench_scale._status_gib("VmHWM"), "seconds": dt,
                      "before": res.report.params_before, "after": res.report.params_after,
                      "sizes": {k: list(v) for k, v in res.report.sizes.items()}}))


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(path / shard, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = tuple(f.get_slice(k).get_shape())
    return out


def check(shape: str, src: Path, dst: Path, ratio: float) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    import graphprune as gp

    cfg_out = AutoConfig.from_pretrained(dst)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(cfg_out)
    want = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    got = _shapes(dst)
    if want != got:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise SystemExit(f"check failed: config.json does not rebuild {bad[:3]}")
    cfg = bench_scale._config(shape)
    cfg.num_hidden_layers = 2
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    names = list(model.state_dict())
    model.load_state_dict(bench_scale._read(src, names), assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # buffers were built on meta
    model.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = gp.prune(model, (x,), ratio=ratio, criterion="l2", uniform=True,
                   ignore=["model.embed_tokens"], inplace=True)
    del model
    theirs = ref.model.state_dict()
    ours = bench_scale._read(dst, [n for n in theirs if n.startswith("model.layers.")])
    bad = [n for n, t in ours.items() if not torch.equal(t, theirs[n])]
    if bad:
        raise SystemExit(f"check failed: {bad[:3]} differ from the in-memory gp.prune")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cfg_out.num_hidden_layers = 2
        cfg_out.save_pretrained(tmp)
        from safetensors.torch import save_file

        rest = bench_scale._read(dst, ["model.embed_tokens.weight", "model.norm.weight",
                                       "lm_head.weight"])
        save_file({**ours, **rest}, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        del ours, rest
        two = AutoModelForCausalLM.from_pretrained(tmp).eval()
        with torch.no_grad():
            diff = float((two(x).logits - ref.model(x).logits).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"check failed: reloaded 2-layer slice differs by {diff:.2e}")
    return ("config rebuilds every output shape; layers 0-1 equal in-memory gp.prune("
            f"uniform=True); reloaded 2-layer slice logits within {diff:.1e}")


def write(row: list) -> None:
    text = Path(record.PATH).read_text()
    rows = []
    if START in text:
        part = text.split(START, 1)[1].split(END, 1)[0]
        rows = [r for r in part.splitlines() if r.startswith("| ") and not
                r.startswith("| shape") and bench_scale._row_key(r) != row[0]]
    new = "| " + " | ".join(str(c) for c in row) + " |"
    table = "\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD),
                       *sorted(rows + [new], key=bench_scale._row_key)])
    body = ("\n### Larger than memory: streamed uniform structured pruning from a safetensors "
            "checkpoint (issue 17)\n\n"
            "The fp32 Llama checkpoints of `bench_scale.py` (random weights, written shard by "
            "shard; never whole in memory); `gp.prune_checkpoint(src, dst, ratio, "
            "criterion='l2')` in a fresh process: two streamed passes (score every layer, then "
            "slice and write each layer as its own shard), the same count of MLP channels and "
            "kv-head groups removed in every layer, hidden size and head size kept. Peak RSS = "
            "VmHWM of that process (reset after imports). Check: see "
            "`benchmarks/bench_scale_prune.py`. Shared 2-core machine: times are noisy.\n\n"
            + table + "\n")

    def after_scale(text: str, block: str) -> str:
        end = bench_scale.END
        if end in text:
            i = text.index(end) + len(end)
            return text[:i] + "\n\n" + block + text[i:]
        return text.rstrip() + "\n\n" + block + "\n"

    record.write_block(START, END, body, insert=after_scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(bench_scale.SHAPES), default="1b")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--dir", default="/work/tmp-scale")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    root = Path(args.dir) / f"prune-{args.shape}"
    if root.exists():
        raise SystemExit(f"{root} exists (a previous run?): remove it first")
    # the output is smaller, but prune_checkpoint asks for src's size
    bench_scale.require_disk(args.dir, 2 * bench_scale.checkpoint_bytes(args.shape) + 2 * GIB)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    src, dst = root / "src", root / "out"
    try:
        t0 = time.perf_counter()
        params, size = bench_scale.build_checkpoint(args.shape, src)
        build_s = time.perf_counter() - t0
        print(f"built {src}: {params / 1e9:.2f} B params, {size / GIB:.2f} GiB in {build_s:.0f} s",
              flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape,
               "--src", str(src), "--dst", str(dst), "--ratio", str(args.ratio)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the prune_checkpoint subprocess failed (exit {proc.returncode})")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        out_size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        verdict = check(args.shape, src, dst, args.ratio)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sizes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in got["sizes"].items() if a != b)
    row = [args.shape, f"{got['before'] / 1e9:.2f} B -> {got['after'] / 1e9:.2f} B",
           f"{size / GIB:.2f} -> {out_size / GIB:.2f}", args.ratio, sizes,
           f"{got['baseline']:.2f}", f"{got['hwm']:.2f}", f"{got['hwm'] - got['baseline']:.2f}",
           f"{got['seconds']:.0f}", f"{build_s:.0f}", verdict, record.cpu_name(),
           datetime.date.today().isoformat(), f"{load0}; {load1}"]
    print(record.md_table(HEAD, [row]))
    if not args.no_write:
        write(row)


if __name__ == "__main__":
    main()
