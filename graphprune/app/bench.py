"""``graphprune bench ARTIFACT``: latency of an artifact against the model it came from.

Runs after :func:`graphprune.app.pipeline.run`: reads the artifact's ``recipe.json`` to rebuild
the source model and its example inputs (same seed, same arrays), then times the source (torch
eager or onnxruntime), the pruned ONNX model (ONNX sources) and the compiled artifact in this one
process, one after another. The result goes to ``ARTIFACT/bench.json``, which the report reads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.app.atomic import write_text_atomic
from graphprune.app.models_io import load_model, make_inputs
from graphprune.frontends import kind_of
from graphprune.ir.errors import ArtifactError, ConfigError

__all__ = ["bench_artifact", "time_calls"]


def time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> dict:
    """``warmup`` untimed calls, then the median and p90 of ``runs`` timed ones (ms)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return {"median_ms": float(np.median(ts)), "p90_ms": float(ts[int(0.9 * (len(ts) - 1))]),
            "runs": runs}  # fmt: skip


def _ort_runner(proto: Any, inputs: tuple) -> Callable[[], Any]:
    from graphprune.frontends.onnx.session import feeds_for, ort_session

    sess = ort_session(proto)
    feed = feeds_for(sess, inputs)
    return lambda: sess.run(None, feed)


def _candidates(source: Any, inputs: tuple, art_dir: Path) -> list[tuple[str, Callable[[], Any]]]:
    """The source model's (and the pruned ONNX model's) runners, named for the table."""
    if kind_of(source) == "torch":
        import torch

        source.eval()

        def eager():
            with torch.no_grad():
                source(*inputs)

        return [(f"source (torch eager, {torch.get_num_threads()} threads)", eager)]
    out = [("source (onnxruntime)", _ort_runner(source, inputs))]
    if (art_dir / "model.onnx").is_file():
        import onnx

        pruned = onnx.load(str(art_dir / "model.onnx"))
        out.append(("pruned (onnxruntime)", _ort_runner(pruned, inputs)))
    return out


def bench_artifact(artifact: str | os.PathLike, runs: int = 30, warmup: int = 5,
                   progress: Callable[[str], None] | None = None, save: bool = True) -> dict:  # fmt: skip
    """Median latency of the source model (torch eager or onnxruntime), the pruned ONNX model
    (ONNX sources) and the compiled artifact, measured in this one process on the same inputs.
    Written to ``ARTIFACT/bench.json`` (read by the report) unless ``save=False``."""
    from graphprune.runtime import load

    if runs < 1 or warmup < 0:
        raise ConfigError("bench: runs must be >= 1 and warmup >= 0")
    step = progress or (lambda m: None)
    art_dir = Path(artifact)
    art = load(art_dir)
    recipe_path = art_dir / "recipe.json"
    if not recipe_path.is_file():
        raise ArtifactError(f"{art_dir} has no recipe.json: bench needs an artifact written by "
                            f"`graphprune run` (it names the source model)")  # fmt: skip
    rec = json.loads(recipe_path.read_text())
    step(f"loading the source model {rec['model']}")
    source, _ = load_model(rec["model"])
    torch_form = kind_of(source) == "torch"
    inputs = make_inputs(rec["inputs"], rec.get("seed", 0), torch_form)
    candidates = _candidates(source, inputs, art_dir)
    arrays = [x.numpy() for x in inputs] if torch_form else [np.asarray(x) for x in inputs]
    candidates.append((f"artifact (TVM {art.manifest['target'].get('kind')})",
                       lambda: art(*arrays)))  # fmt: skip
    rows = []
    for name, fn in candidates:
        step(f"timing {name}: {warmup} warm-up + {runs} runs")
        rows.append({"name": name, **time_calls(fn, runs, warmup)})
    res = {"rows": rows, "inputs": rec["inputs"]}
    if save:
        write_text_atomic(art_dir / "bench.json", json.dumps(res, indent=2, sort_keys=True) + "\n")
    return res
