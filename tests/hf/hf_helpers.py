"""Shared pieces of the Hugging Face tests: pruning a zoo model and its dead-channel reference.

The reference is the *original* ``transformers`` model with every channel the plan removes made
dead (each parameter slice of the removed group zeroed), so it runs at any shape and with any
optional input, like the pruned model must.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch
from graphprune.models.hf import pretrained_tiny
from graphprune.passes.coupling import build_coupling

import graphprune as gp
from graphprune.testing.oracle import dead_positions

# The residual stream feeds RMSNorm/LayerNorm statistics, so removing it is not exact; the
# oracle tests keep it (the uniform default already keeps it for BERT/GPT-2, head size rule).
EMBEDDINGS = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens",
              "vit": "embeddings.patch_embeddings"}  # fmt: skip


def pruned(family: str, **kw):
    model, x = pretrained_tiny(family)
    res = gp.prune(model, x, **kw)
    return model, x, res


def dead_copy(model: torch.nn.Module, res) -> torch.nn.Module:
    """``model`` with the channels ``res`` removed made dead (zeroed in every member slice)."""
    pg, plan = res.graph, res.plan
    groups = build_coupling(pg).groups
    ref = copy.deepcopy(model)
    tensors = {**dict(ref.named_parameters(remove_duplicate=False)),
               **dict(ref.named_buffers(remove_duplicate=False))}  # fmt: skip
    with torch.no_grad():
        for gid in res.selection.removal:
            assert groups[gid].exact, f"group {gid} is not exact: the oracle would not hold"
            for m in groups[gid].params:
                t = tensors[m.param]
                dead = dead_positions(plan, m.value, m.axis, t.shape[m.axis])
                t.index_fill_(m.axis, torch.from_numpy(dead), 0)
    return ref


def token_batch(batch: int, seq: int, masked: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    if not masked:
        return {"input_ids": ids}
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, : seq // 3] = 0  # left padding on the first row
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


# Fresh processes: inputs and outputs cross as safetensors files (no pickle).
PLAIN = r"""
import sys
import transformers
from safetensors.torch import load_file, save_file
out = {}
for d in sys.argv[1:]:
    cfg = transformers.AutoConfig.from_pretrained(d)
    auto = (transformers.AutoModelForCausalLM if cfg.architectures[0].endswith("LMHeadModel")
            or cfg.architectures[0].endswith("ForCausalLM") else transformers.AutoModel)
    m = auto.from_pretrained(d).eval()
    assert type(m).__name__ == cfg.architectures[0], type(m).__name__
    x = load_file(d + "/inputs.safetensors")
    o = m(**x)
    out[d] = (o.logits if "logits" in o else o.last_hidden_state).detach().contiguous()
assert "graphprune" not in sys.modules
save_file({str(i): t for i, t in enumerate(out.values())}, sys.argv[1] + "/outputs.safetensors")
"""

GRAPHPRUNE = r"""
import sys
import graphprune
from safetensors.torch import load_file, save_file
d = sys.argv[1]
m = graphprune.from_pretrained(d)
x = load_file(d + "/inputs.safetensors")
o = m(**x)
save_file({"0": (o.logits if "logits" in o else o.last_hidden_state).detach().contiguous()},
          d + "/outputs.safetensors")
"""


def run_script(script: str, *dirs: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", script, *dirs], capture_output=True, text=True,
                       env=env, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(os.path.join(dirs[0], "outputs.safetensors"))
