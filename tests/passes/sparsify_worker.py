"""One rank of the distributed-sparsify test (tests/passes/test_sparsity_distributed.py).

Run as ``python -m torch.distributed.run --nproc-per-node 2 sparsify_worker.py OUT``: each rank
joins a gloo group, sparsifies the cases of :func:`cases` with ``distributed=True`` on one thread
and saves its masks (and SparseGPT's reconstructed weights) to ``OUT/rank<r>.pt``; the test
compares them with a one-process run of the same cases. Builders are shared with the test.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

CALIB_BATCHES = 3  # odd on purpose: rank 1 joins the last round with nothing to add


def llama():
    from graphprune.models.hf import pretrained_tiny

    return pretrained_tiny("llama")[0]


def llama_calib():
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(CALIB_BATCHES):
        mask = torch.ones(2, 16, dtype=torch.int64)
        mask[1, 12 - i :] = 0  # right padding: padded tokens stay out of the statistics
        out.append({"input_ids": torch.randint(0, 128, (2, 16), generator=gen),
                    "attention_mask": mask})
    return out


def convnet():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


def conv_calib():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(CALIB_BATCHES)]


def cases():
    """name -> (model builder, calib builder, sparsify kwargs)."""
    return {
        "llama-wanda": (llama, llama_calib, {"method": "wanda", "sparsity": 0.5}),
        "llama-sparsegpt": (llama, llama_calib, {"method": "sparsegpt", "sparsity": 0.5}),
        "llama-wanda-2:4-obs": (llama, llama_calib, {"method": "wanda", "pattern": "2:4",
                                                     "update": "obs"}),
        "conv-wanda": (convnet, conv_calib, {"method": "wanda", "sparsity": 0.5, "exclude": []}),
        "conv-sparsegpt": (convnet, conv_calib, {"method": "sparsegpt", "sparsity": 0.5}),
    }


_GRAPHS: dict = {}


def run_case(name, distributed):
    """One case's masks and resulting weights. The graph is captured once per model (capture,
    not sparsity, is what costs seconds here) and handed to each case with ``graph=``."""
    import graphprune as gp
    from graphprune.frontends.torch import hf

    make, calib, kw = cases()[name]
    batches = calib()
    if make not in _GRAPHS:
        model = make()
        with hf.capture_mode(model):  # as gp.sparsify captures (transformers' cache off)
            _GRAPHS[make] = gp.capture(model, batches[0])
    res = gp.sparsify(make(), calib=batches, distributed=distributed, graph=_GRAPHS[make], **kw)
    assert res.graph is _GRAPHS[make]
    masks = {k: m.numpy().copy() for k, m in res.masks.items()}
    weights = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
    return {"masks": masks, "weights": weights}


def main(out: str) -> None:
    import torch.distributed as dist

    import graphprune as gp
    from graphprune.ir.errors import ConfigError

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    got = {name: run_case(name, True) for name in cases()}
    # Inconsistent inputs: rank 1 brings other calibration batches.
    calib = conv_calib()
    if rank == 1:
        calib[2] = calib[2] + 1.0
    try:
        gp.sparsify(convnet(), calib=calib, method="wanda", distributed=True)
        got["inconsistent"] = "no error"
    except ConfigError as e:
        got["inconsistent"] = str(e)
    try:
        gp.sparsify(convnet(), (torch.randn(1, 3, 8, 8),), method="magnitude", distributed=True)
        got["magnitude"] = "no error"
    except ConfigError as e:
        got["magnitude"] = str(e)
    torch.save(got, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
