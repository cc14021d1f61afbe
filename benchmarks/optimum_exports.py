"""Make ``tests/data/optimum/*.onnx``: HF models exported by optimum's ONNX exporter.

optimum-onnx 0.1.0 pins ``transformers<4.58`` while the project uses transformers 5, so this
runs in a separate environment that never touches the project's: a venv under /tmp whose own
site-packages (optimum, transformers 4.57) come first and that reuses the project venv's torch
and onnx through a ``.pth`` file (pip then sees torch as installed and downloads no second copy):

    python -m venv /tmp/optenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > \\
        /tmp/optenv/lib/python3.11/site-packages/zz_project.pth
    /tmp/optenv/bin/pip install "optimum-onnx==0.1.0"   # brings optimum 2.1, transformers 4.57.6
    /tmp/optenv/bin/python benchmarks/optimum_exports.py tests/data/optimum

Each model is built from a small random config (hidden 32, 2 layers, 4 heads; LLaMA with 2 KV
heads, GQA), saved with ``save_pretrained`` to a folder and exported from that folder with
``optimum.exporters.onnx.main_export`` (what ``optimum-cli export onnx`` runs), with optimum's
own validation against the PyTorch model. optimum writes opset 18 and makes every input dim
symbolic (``batch_size``, ``sequence_length``; ViT also ``num_channels``, ``height``,
``width``). The files are ~120-200 KB each; the tests read them
(``tests/frontends/test_onnx_optimum.py``). Prints one line per model; no assertions.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile


def specs() -> dict:
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        ViTConfig,
        ViTModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)  # fmt: skip
    return {
        "bert": (BertModel, BertConfig(vocab_size=64, max_position_embeddings=64, **small),
                 "feature-extraction"),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                             n_positions=64), "text-generation"),
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=64, num_key_value_heads=2,
                                                max_position_embeddings=64, **small),
                  "text-generation"),
        "vit": (ViTModel, ViTConfig(image_size=32, patch_size=8, **small),
                "image-feature-extraction"),
    }  # fmt: skip


def main() -> None:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/optimum"
    os.makedirs(out, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name, (cls, cfg, task) in specs().items():
        torch.manual_seed(0)
        work = tempfile.mkdtemp(prefix=f"optimum_{name}_")
        try:
            cls(cfg).eval().save_pretrained(os.path.join(work, "hf"))
            main_export(os.path.join(work, "hf"), output=os.path.join(work, "onnx"), task=task,
                        do_validation=True)  # fmt: skip
            dest = os.path.join(out, f"{name}.onnx")
            shutil.copy(os.path.join(work, "onnx", "model.onnx"), dest)
            print(f"{name}: {task}, {os.path.getsize(dest)} bytes -> {dest}")
        except Exception as e:  # noqa: BLE001 - reported per model
            print(f"{name}: export failed: {type(e).__name__}: {str(e)[:200]}")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
