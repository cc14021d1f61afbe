"""ONNX coverage: every zoo model exported three ways, captured, pruned and run.

For each model of ``graphprune.models.ZOO`` (and ``--models``) and each export form — the legacy
exporter with static shapes (``legacy``), the legacy exporter with a dynamic batch
(``legacy_dyn``, ``dynamic_axes={input: {0: "batch"}}``) and the dynamo exporter (``dynamo``) —
prints: captured, prunable groups, pruned OK (``gp.prune(path, ratio=0.3)``, which runs the
written model in onnxruntime itself; dynamic exports are then run at batch 1 and 5), or the
reason it was refused. One run, no assertions.

The legacy exporter has no ONNX for ``aten::diff``, which transformers' mask code calls for a
decoder run without an ``attention_mask`` (``find_packed_sequence_indices``, to detect packed
sequences); such a model (``hf_llama_tiny``) is exported as deployed exports are, with an
``attention_mask`` input of ones, and its row says ``+attention_mask``.

    .venv/bin/python benchmarks/bench_onnx_coverage.py [--models swin_tiny,vit_tiny] [--out DIR]
        [--forms legacy,legacy_dyn,dynamo,op11,op21,fp16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

FORMS = ("legacy", "legacy_dyn", "dynamo")
#: more forms for --forms: the legacy exporter at opset 11 / 21 (transformers models with their
#: eager attention below opset 14, where the exporter has no scaled_dot_product_attention), and
#: in fp16 (model.half() before a legacy export at opset 17)
EXTRA_FORMS = ("op11", "op21", "fp16", "seq_dyn")
#: ``seq_dyn``: models on token ids only, legacy exporter with batch *and* sequence dynamic
#: (``{0: "batch", 1: "seq"}``) and an ``attention_mask`` input where the model takes one; the
#: pruned model is run at (batch, seq) = (1, 5) and (5, 40); a sequence that falls back to static
#: says why


def export(model, inputs, path: str, form: str) -> None:
    import contextlib
    import io

    import torch

    if form == "fp16":
        model = model.half()
        inputs = tuple(x.half() if x.is_floating_point() else x for x in inputs)
    names = [f"input_{i}" for i in range(len(inputs))]
    kw: dict = {"input_names": names}
    if form == "dynamo":
        kw["dynamo"] = True
    else:
        kw.update(dynamo=False, opset_version={"op11": 11, "op21": 21}.get(form, 17))
        if form == "legacy_dyn":
            kw["dynamic_axes"] = {n: {0: "batch"} for n in names}
        if form == "seq_dyn":
            kw["dynamic_axes"] = {n: {0: "batch", 1: "seq"} for n in names}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            torch.no_grad():  # fmt: skip
        torch.onnx.export(model, tuple(inputs), path, **kw)


def with_attention_mask(model, inputs):
    """``(model, inputs)`` taking an ``attention_mask`` of ones after its own inputs, or ``None``
    when the model is not a :class:`graphprune.models.hf.TensorOutputs` that can take one."""
    import inspect

    import torch
    from graphprune.models.hf import TensorOutputs

    if not isinstance(model, TensorOutputs) or "attention_mask" in model.input_names:
        return None
    if "attention_mask" not in inspect.signature(model.model.forward).parameters:
        return None
    names = tuple(model.input_names) + ("attention_mask",)
    wrapped = TensorOutputs(model.model, names, model.output_names).eval()
    return wrapped, tuple(inputs) + (torch.ones_like(inputs[0]),)


def check(path: str, form: str) -> tuple[str, str, str]:

    import graphprune as gp
    from graphprune.frontends.onnx.session import run_onnx

    try:
        pg = gp.capture(path)
    except Exception as e:  # noqa: BLE001 - the table reports it
        return "no", "-", f"{type(e).__name__}: {str(e)[:90]}"
    prunable = sum(g.prunable for g in gp.groups(pg))
    if not prunable:
        return "yes", "0", "nothing to prune"
    try:
        res = gp.prune(path, ratio=0.3, graph=pg)
        sizes = {"legacy_dyn": [{"batch": 1}, {"batch": 5}],
                 "seq_dyn": [{"batch": 1, "seq": 5}, {"batch": 5, "seq": 40}]}.get(form, [])
        for at in sizes:
            at = {d: n for d, n in at.items() if d in pg.source.dynamic.sizes}
            run_onnx(res.model, pg.source.feeds(pg, at))
    except Exception as e:  # noqa: BLE001
        return "yes", str(prunable), f"{type(e).__name__}: {str(e)[:90]}"
    static = [f"{k} static: {v.split(': ', 1)[-1][:70]}" for k, v in pg.static_axes.items()
              if "falls back" in v][:1]  # fmt: skip
    return "yes", str(prunable), "; ".join(["OK", *static])


def machine() -> str:
    """``lscpu``'s model name, cores, the date, the load average and the library versions."""
    import datetime
    import subprocess

    import onnx
    import onnxruntime
    import onnxslim
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                   if ln.startswith("Model name"))  # fmt: skip
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, load average {load}; "
            f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, onnxslim {onnxslim.__version__}")


def main() -> None:
    from graphprune import models

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(models.ZOO))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    out = args.out or tempfile.mkdtemp(prefix="onnx_cov_")
    os.makedirs(out, exist_ok=True)
    print(f"Run on {machine()}.\n")
    print("| model | export | captured | prunable groups | pruned | s |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for form in args.forms.split(","):
            eager = name.startswith("hf_") and form == "op11"
            model, inputs = models.get(name, **({"attn_implementation": "eager"} if eager else {}))
            if form == "seq_dyn":
                if inputs[0].is_floating_point():
                    continue  # images: legacy_dyn covers their batch
                model, inputs = with_attention_mask(model, inputs) or (model, inputs)
            t0 = time.time()
            path = os.path.join(out, f"{name}_{form}.onnx")
            label = f"{form} +attention_mask" if form == "seq_dyn" and len(inputs) > 1 else form
            try:
                export(model, inputs, path, form)
            except Exception as e:  # noqa: BLE001
                masked = with_attention_mask(model, inputs) if "aten::diff" in str(e) else None
                try:
                    if masked is None:
                        raise
                    export(*masked, path, form)
                    label = f"{form} +attention_mask"
                except Exception as e2:  # noqa: BLE001
                    why = str(e2).splitlines()[0][:100]
                    print(f"| {name} | {form} | export failed | - | {type(e2).__name__}: "
                          f"{why} | |", flush=True)  # fmt: skip
                    continue
            cap, n, status = check(path, form)
            status = status.replace("|", "/").replace("\n", " ")
            print(f"| {name} | {label} | {cap} | {n} | {status} | {time.time() - t0:.1f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
