"""``gp.sensitivity(..., executor=...)`` (issue 17): the (group, ratio) trials as Ray tasks on a
local Ray cluster give the serial run's table exactly; bad executors and a missing Ray are
ConfigErrors."""

from __future__ import annotations

import sys

import pytest
import torch

import graphprune as gp
from graphprune.api.executors import SerialExecutor, get_executor
from graphprune.ir.errors import ConfigError


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=gen)


def _agreement(x, ref):
    """A metric of the pruned model: cosine of its outputs with the dense ones (a closure over
    tensors, as users write them: cloudpickle ships it to the workers)."""

    def metric(model):
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(model(x), ref, dim=1).mean())

    return metric


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.heavy  # a local Ray cluster: ~10-20 s to start and import torch in its workers
def test_ray_trials_give_the_serial_table(ray_session):
    model, x = _net(), _data()
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray tasks run on one thread: the same float sums
    try:
        serial = gp.sensitivity(model, (x,), _agreement(x, ref), ratios=[0.25, 0.5, 0.75])
    finally:
        torch.set_num_threads(threads)
    ray = gp.sensitivity(model, (x,), _agreement(x, ref), ratios=[0.25, 0.5, 0.75],
                         executor="ray")
    assert len(serial.rows) >= 3 and any(v < 0.999 for _, _, vals in serial.rows for v in vals)
    assert ray.rows == serial.rows and ray.baseline == serial.baseline
    assert ray.to_text() == serial.to_text()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def failing(m):
        if sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in model.parameters()):
            raise ConfigError("eval_fn refuses pruned models")
        return 1.0

    with pytest.raises(ConfigError, match="eval_fn refuses pruned models"):
        gp.sensitivity(model, (x,), failing, ratios=[0.5], executor="ray")


def test_executor_option_is_checked():
    assert isinstance(get_executor("serial"), SerialExecutor)
    assert isinstance(get_executor(None), SerialExecutor)
    with pytest.raises(ConfigError, match="executor='dask': use 'serial', 'ray'"):
        gp.sensitivity(_net(), (_data(),), lambda m: 0.0, executor="dask")


def test_executor_ray_without_ray_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match="pip install ray"):
        gp.sensitivity(_net(), (_data(),), lambda m: 0.0, executor="ray")


def test_custom_executor_runs_every_trial():
    calls = []

    class Recording:
        def map(self, fn, shared, items):
            calls.extend(items)
            return [fn(shared, *it) for it in items]

    model, x = _net(), _data()
    sens = gp.sensitivity(model, (x,), lambda m: float(m(x).detach().sum()), ratios=[0.5],
                          executor=Recording())
    assert len(calls) == len(sens.rows) >= 3
