"""Distributed one-shot sparsity (issue 17): ``gp.sparsify(..., distributed=True)`` under
torchrun, 2 gloo ranks on CPU, gives masks and weights identical (bit for bit) to one process.

Cases (tests/passes/sparsify_worker.py): a transformers Llama from a random config (hidden 64,
2 layers, GQA; dict batches with right padding, so the sequential block-by-block path and the
token mask run) and a conv/MLP net without a block list (whole-model hooks), with wanda,
sparsegpt and wanda 2:4 + OBS update; 3 batches on 2 ranks, so one rank joins the last round
with nothing to add. The same launch checks that ranks given different batches all raise
ConfigError and that a method with no statistics is refused.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.ir.errors import ConfigError

WORKER = Path(__file__).with_name("sparsify_worker.py")


def _worker():
    spec = importlib.util.spec_from_file_location("sparsify_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single():
    """The one-process run of every case, on one thread like each rank (a matmul's result can
    depend on how many threads split it)."""
    w, threads = _worker(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: w.run_case(name, False) for name in w.cases()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.heavy  # torchrun + 2 ranks importing transformers and capturing: ~75 s loaded
@pytest.mark.parametrize("case", list(_worker().cases()))
def test_masks_and_weights_identical_to_one_process(ranks, single, case):
    want = single[case]
    assert want["masks"] and any(not m.all() for m in want["masks"].values())
    for r, got in enumerate(ranks):
        g = got[case]
        assert g["masks"].keys() == want["masks"].keys(), r
        for k, m in want["masks"].items():
            assert np.array_equal(g["masks"][k], m), (r, k)
        assert g["weights"].keys() == want["weights"].keys()
        for k, v in want["weights"].items():
            assert torch.equal(g["weights"][k], v), (r, k)


@pytest.mark.heavy
def test_ranks_with_different_batches_all_raise(ranks):
    for got in ranks:
        assert "ranks disagree on calibration batches" in got["inconsistent"], got["inconsistent"]
        assert "same model, options and calibration batches" in got["inconsistent"]


@pytest.mark.heavy
def test_method_without_statistics_is_refused(ranks):
    for got in ranks:
        assert "method 'magnitude' has none to split" in got["magnitude"], got["magnitude"]


def test_distributed_without_a_process_group_says_to_run_under_torchrun():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    calib = [torch.randn(4, 8) for _ in range(2)]
    with pytest.raises(ConfigError, match="process group: run the script under torchrun"):
        gp.sparsify(lin, calib=calib, method="wanda", distributed=True)
    with pytest.raises(ConfigError, match="distributed='yes': pass True or False"):
        gp.sparsify(lin, calib=calib, method="wanda", distributed="yes")


def test_partials_folded_in_batch_order_give_the_one_process_totals():
    """What each rank does with its share (keep each batch's partial apart) and what every rank
    does after the all-gather (fold them in batch order) reaches one process's totals bit for bit,
    the report's sample rows included; two hook calls per batch (a module used twice)."""
    from graphprune.passes.sparsity.calibration import LayerStats

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 24, generator=gen) * 10.0 ** (i - 2)
               for i, n in enumerate((300, 170, 90, 400, 60))]
    one = LayerStats(24, True)
    for b in batches:
        one.add(b, "l")
        one.add(b[::2] * 0.5, "l")
        one.end_batch()
    shares, parts = [LayerStats(24, True), LayerStats(24, True)], []
    for i, b in enumerate(batches):  # rank i % 2 runs batch i
        st = shares[i % 2]
        st.add(b, "l")
        st.add(b[::2] * 0.5, "l")
        parts.append(st.part)
        st.part = None
    folded = LayerStats(24, True)
    for p in parts:
        folded.fold(p)
    assert folded.n == one.n == sum(b.shape[0] + b[::2].shape[0] for b in batches)
    for name in ("sq", "s1", "H"):
        assert getattr(one, name).dtype == torch.float64
        assert torch.equal(getattr(folded, name), getattr(one, name)), name
    assert torch.equal(folded.sample(), one.sample()) and one.sample().shape[0] == 512
