"""Where independent trials run: in this process, or as tasks on a Ray cluster.

A search that evaluates many candidates independently (``gp.sensitivity``: one prune-and-evaluate
trial per group and ratio) hands them to an executor: ``executor.map(fn, shared, items)`` returns
``[fn(shared, *item) for item in items]`` in order, wherever the calls ran. ``shared`` is what
every trial needs (the model, the evaluation function); Ray ships it once to the object store
rather than once per task.

- ``"serial"`` (default): a loop in this process.
- ``"ray"``: one Ray task per item (1 CPU each) on the Ray session this process already
  initialised, else a local one (``ray.init()``, all this machine's cores).
- ``"ray:<address>"`` or ``"ray://host:port"``: connect to a cluster first (``ray:auto`` on a
  node of a running cluster, ``ray://head:10001`` through Ray Client).
- any object with that ``map`` method.

Ray is optional (``pip install ray``, or the ``distributed`` extra). What ``fn`` and ``shared``
hold must pickle (cloudpickle: lambdas and closures do). Results equal the serial run's when
``fn`` is deterministic; Ray runs each task on one thread (``OMP_NUM_THREADS=1``), so a
floating-point evaluation equals the serial one bit for bit when that one ran on one thread too
(a matmul's result can depend on how many threads split it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from graphprune.ir.errors import ConfigError

__all__ = ["RayExecutor", "SerialExecutor", "get_executor"]


class SerialExecutor:
    """Run the trials one after the other in this process."""

    name = "serial"

    def map(self, fn: Callable[..., Any], shared: Any, items: Sequence[tuple]) -> list:
        return [fn(shared, *item) for item in items]


class RayExecutor:
    """One Ray task per trial on a Ray cluster (a local one when none is running).

    Parameters
    ----------
    address : str, optional
        Passed to ``ray.init(address=...)`` when this process has no Ray session yet
        (``"auto"``, ``"ray://head:10001"``); ``None`` starts a local cluster.
    """

    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise ConfigError("executor='ray' needs Ray: pip install ray (or pip install "
                              "'graphprune[distributed]'), or use executor='serial'") from e
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except Exception as e:  # Ray's connection errors vary by version
                where = "a local cluster" if address is None else f"address {address!r}"
                raise ConfigError(f"executor: could not start or reach Ray at {where} "
                                  f"({type(e).__name__}: {e}); check the address, or call "
                                  "ray.init(...) yourself before") from e

    def map(self, fn: Callable[..., Any], shared: Any, items: Sequence[tuple]) -> list:
        ray = self.ray
        task = ray.remote(num_cpus=1)(fn)
        ref = ray.put(shared)
        futures = [task.remote(ref, *item) for item in items]
        try:
            return ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            for f in futures:  # the rest would run for nothing (finished ones: no-op)
                ray.cancel(f)
            # The trial's own exception (a ConfigError stays one), not Ray's wrapper.
            raise e.as_instanceof_cause() from None


def get_executor(executor: Any = "serial"):
    """The executor an ``executor=`` option names (see the module docstring)."""
    if executor is None or executor == "serial":
        return SerialExecutor()
    if isinstance(executor, str):
        if executor == "ray":
            return RayExecutor()
        if executor.startswith("ray://"):
            return RayExecutor(executor)
        if executor.startswith("ray:"):
            return RayExecutor(executor[len("ray:"):])
    elif callable(getattr(executor, "map", None)):
        return executor
    raise ConfigError(f"executor={executor!r}: use 'serial', 'ray', 'ray:<address>' (e.g. "
                      "'ray:auto'), 'ray://host:port', or an object with a "
                      "map(fn, shared, items) method")
