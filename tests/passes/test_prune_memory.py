"""gp.prune's memory discipline: no whole-model copies beyond the result (issue 17).

Peak RSS figures are in ``benchmarks/bench_prune_memory.py``; these tests pin the mechanisms
that keep them low: scores computed over bounded slices of a weight, an in-place prune that
replaces only the pruned tensors, and a copy that never aliases the user's tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes.prune import criteria


@pytest.mark.parametrize("shape,axis", [((300, 70), 0), ((300, 70), 1), ((16, 8, 3, 3), 1),
                                        ((16, 8, 3, 3), 0)])  # fmt: skip
@pytest.mark.parametrize("p", [1, 2])
def test_abs_power_sums_do_not_depend_on_the_slicing(monkeypatch, shape, axis, p):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    whole = criteria.abs_power_sums(w, axis, p)
    monkeypatch.setattr(criteria, "_CHUNK_BYTES", 64)  # one position per slice
    sliced = criteria.abs_power_sums(w, axis, p)
    assert np.array_equal(whole, sliced)
    ref = (np.abs(np.moveaxis(w.astype(np.float64), axis, 0).reshape(shape[axis], -1)) ** p).sum(1)
    np.testing.assert_allclose(whole, ref, rtol=1e-12)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()  # fmt: skip


def test_inplace_prune_replaces_only_the_pruned_tensors():
    model = _mlp()
    before = {n: p for n, p in model.named_parameters()}
    x = torch.randn(3, 16)
    res = gp.prune(model, (x,), ratio=0.5, inplace=True, dynamic_shapes=False)
    assert res.model is model
    after = dict(model.named_parameters())
    changed = {n for n in after if after[n].shape != before[n].shape}
    assert changed, "nothing was pruned"
    for n in after:  # an unchanged tensor is the user's own object, not a copy of it
        assert (after[n] is before[n]) == (n not in changed), n
    assert model[4].weight.shape == (4, 16) and model[4].in_features == 16


def test_copy_never_aliases_the_users_tensors():
    model = _mlp()
    x = torch.randn(3, 16)
    res = gp.prune(model, (x,), ratio=0.5, dynamic_shapes=False)
    users = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() not in users for p in res.model.parameters())
    assert model[0].weight.shape == (32, 16)  # the user's model is untouched


_PEAK_SCRIPT = r"""
import ctypes, json, sys
from pathlib import Path
import torch
from torch import nn
import graphprune as gp

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

torch.manual_seed(0)
warm = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()  # lazy imports, caches
gp.prune(warm, (torch.randn(2, 8),), ratio=0.25, inplace=sys.argv[1] == "inplace",
         dynamic_shapes=False)
width = 4096
model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())],
                      nn.Linear(width, 8)).eval()
x = torch.randn(2, width)
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
gp.prune(model, (x,), ratio=0.25, inplace=sys.argv[1] == "inplace", dynamic_shapes=False)
print(json.dumps({"peak": (kib("VmHWM") - base) * 1024 / nbytes}))
"""


@pytest.mark.parametrize("mode,limit", [("inplace", 1.0), ("copy", 1.6)])
def test_peak_memory_of_prune(tmp_path, mode, limit):
    """Peak RSS above the model's baseline, in model bytes. In place the pruned weights
    (0.56x here: 25% of rows and columns) plus slack; a copy adds the result (0.56x) and its
    deep copy's transient (up to 1x). Measured 0.80x and 1.27x when written; before the
    shared-tensor trial, the early-freed GraphModule reference and sliced scoring, a 4-layer
    Llama of TinyLlama's width peaked at 2.04x in place and 1.88x as a copy."""
    import json
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    print(f"{mode}: peak {peak:.2f}x")
    assert peak <= limit, f"{mode}: peak {peak:.2f}x the model's bytes"
