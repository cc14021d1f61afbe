"""ONNX Runtime and OpenVINO as peers of a compiled artifact: same weights, same inputs, timed in
turns in one process (issue 16).

A user who wants a fast CPU model exports it to ONNX and runs ONNX Runtime or OpenVINO, so those
are the bar, not PyTorch eager. Given a torch model and its inputs (already pruned/sparsified:
the peers get exactly the weights our artifact was compiled from):

* :func:`export_onnx` writes it once (legacy exporter, opset 17, constants folded);
* :func:`ort_runner` opens it in ONNX Runtime: every graph optimisation, ``intra_op_num_threads``
  = T, ``inter_op_num_threads`` = 1, sequential execution;
* :func:`openvino_runner` compiles it for OpenVINO's CPU plugin with ``INFERENCE_NUM_THREADS`` = T,
  ``INFERENCE_PRECISION_HINT`` = f32 (no bf16/AMX downcast: we compare fp32 with fp32) and the
  latency hint (one stream);
* :func:`check_agreement` runs every runner once against the torch outputs and refuses to time a
  runner that disagrees (a fast wrong answer is no result);
* :func:`time_turns` times them in interleaved turns (each turn: one untimed call, then
  back-to-back timed calls), so a burst of load from other jobs lands on every column, and
  returns the best and the median of each.

Threads: TVM reads ``TVM_NUM_THREADS`` once, when its runtime starts, so a process measures one
thread count; the benchmarks run one worker process per count. Used by ``bench_codegen.py``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PEERS = ("ort", "openvino")
TURNS = 5


@dataclass(frozen=True)
class Timing:
    best: float  # ms
    median: float  # ms


def as_arrays(inputs) -> list[np.ndarray]:
    """Inputs as C-contiguous numpy arrays (torch tensors by duck typing)."""
    out = []
    for x in inputs:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        out.append(np.ascontiguousarray(x))
    return out


def flat_outputs(out) -> list[np.ndarray]:
    """A model's outputs (tensor, array, tuple/list, transformers ModelOutput) as a flat list."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in flat_outputs(o)]
    if hasattr(out, "detach"):
        return [out.detach().cpu().numpy()]
    return [np.asarray(out)]


def export_onnx(model, inputs: Sequence, path: os.PathLike | str, opset: int = 17) -> Path:
    """Export ``model`` at the shapes of ``inputs`` (static) to ``path``; inputs are named
    ``in0..``, outputs ``out0..``. Returns the path."""
    import torch

    path = Path(path)
    n_out = len(flat_outputs(run_torch(model, inputs)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=True,
                          input_names=[f"in{i}" for i in range(len(inputs))],
                          output_names=[f"out{i}" for i in range(n_out)])  # fmt: skip
    return path


def run_torch(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs)


def torch_runner(model, inputs) -> Callable[[], list[np.ndarray]]:
    import torch

    def call():
        with torch.no_grad():
            return flat_outputs(model(*inputs))

    return call


def ort_session(path, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads;
    with ``profile_prefix``, its per-node profiler on (``session.end_profiling()`` -> JSON)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(path, arrays: list[np.ndarray], threads: int) -> Callable[[], list[np.ndarray]]:
    sess = ort_session(path, threads)
    feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
    return lambda: sess.run(None, feed)


def openvino_compiled(path, threads: int, perf_count: bool = False):
    """An OpenVINO CPU compiled model: ``threads`` inference threads, fp32 precision, latency
    hint; ``perf_count`` turns on the per-layer counters (``get_profiling_info``)."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}  # fmt: skip
    if perf_count:
        config["PERF_COUNT"] = True
    return ov.Core().compile_model(str(path), "CPU", config)


def openvino_runner(path, arrays: list[np.ndarray], threads: int) -> Callable[[], list]:
    compiled = openvino_compiled(path, threads)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def call():
        res = request.infer(arrays)
        return [np.array(res[o]) for o in outputs]

    return call


def peer_runners(onnx_path, arrays: list[np.ndarray], threads: int,
                 names: Sequence[str] = PEERS) -> dict[str, Callable]:  # fmt: skip
    """``{name: call}`` for the requested peers on ``onnx_path``."""
    make = {"ort": ort_runner, "openvino": openvino_runner}
    unknown = set(names) - set(make)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; known: {sorted(make)}")
    return {n: make[n](onnx_path, arrays, threads) for n in names}


def max_abs_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest |got - want| over all outputs; inf when the output lists do not line up."""
    got, want = flat_outputs(got), flat_outputs(want)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    return max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want))


def check_agreement(reference: list[np.ndarray], runners: dict[str, Callable],
                    atol: float) -> dict[str, float]:  # fmt: skip
    """Run each runner once; return ``{name: max abs err vs reference}``. Raises AssertionError
    naming every runner above ``atol`` (its numbers would time a different computation)."""
    errs = {name: max_abs_err(call(), reference) for name, call in runners.items()}
    bad = {n: e for n, e in errs.items() if not e <= atol}
    if bad:
        raise AssertionError(
            "outputs disagree with torch (max abs err): "
            + ", ".join(f"{n} {e:.2e}" for n, e in bad.items()) + f" > atol {atol:g}"
        )
    return errs


def time_turns(calls: dict, repeat: int, rounds: int = TURNS) -> dict:
    """Best and median ms of each callable over ``repeat`` calls taken in ``rounds`` turns (each
    turn: every callable gets one untimed call to warm its caches again after the others, then
    its share of back-to-back timed calls). Returns ``{key: Timing}``."""
    times = {k: [] for k in calls}
    per = max(1, -(-repeat // rounds))
    for _ in range(rounds):
        for k, fn in calls.items():
            fn()
            for _ in range(per):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: Timing(float(np.min(v) * 1e3), float(np.median(v) * 1e3)) for k, v in times.items()}


def best_peer(timings: dict[str, Timing], names: Sequence[str] = PEERS,
              stat: str = "median") -> tuple[str, float]:  # fmt: skip
    """The fastest peer among ``names`` present in ``timings``: ``(name, ms)``."""
    present = [(getattr(timings[n], stat), n) for n in names if n in timings]
    ms, name = min(present)
    return name, ms
