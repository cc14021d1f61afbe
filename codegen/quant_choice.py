"""Per quantized layer: INT8 dense, INT8 block-sparse or fp32 (``gp.compile``'s ``kernels`` and
``int8_tolerance``, issue 18).

Used by :mod:`.quant_rewrite` for every Linear whose weight has a W8A8 ``QuantSpec``, before
anything is emitted for it. In order:

1. **Accuracy budget.** With ``int8_tolerance=t``, a layer whose ``QuantSpec.rel_error`` (the
   relative output error the layer alone adds on the calibration data, measured by
   ``gp.quantize``) is above ``t`` stays fp32. A spec without a measured error (quantized
   without ``calib``) is a ``ConfigError``: the budget cannot be checked.
2. **Kernel.** ``kernels="auto"``: the layer alone is built and timed (interleaved rounds, best
   of each, :func:`graphprune.codegen.sparse_rewrite.warm_ms`) as INT8 dense, INT8 1×4-block
   sparse (:mod:`.kernels.cpu_int8_sparse`, where its blocks are at most
   :data:`BSR_MAX_BLOCK_DENSITY` of the dense ones and the target has AVX-512 VNNI) and fp32
   (whatever ``kernels="auto"`` of :mod:`.sparse_rewrite` picks for it: dense or a sparse
   format); the fastest wins and the decision is cached on disk (key: target, shape, batch,
   scheme, densities). A layer ``auto`` runs fp32 still sees its input quantized (the int8
   quantizer, dequantized: record ``"input": "fake-quantized"``), so the choice changes speed,
   never what the model computes. ``"bsr"`` forces the INT8 block-sparse kernel where it fits;
   any other value runs INT8 dense (there is no INT8 CSR or N:M kernel).

Every decision goes into the layer's manifest record: ``kernel`` (``"int8"``, ``"int8_bsr"`` or
``"fp32"``), ``rel_error``, ``int8_tolerance``, and for ``auto``/``bsr`` the block density (and
for ``auto`` the times).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from graphprune.codegen.kernels.cpu_int8 import pad_k

from graphprune.ir.errors import ConfigError

__all__ = ["BSR_MAX_BLOCK_DENSITY", "Int8Chooser", "block_density", "check_tolerance"]

# Above this fraction of nonzero 1x4 blocks the block-sparse kernel does more than half the
# dense VNNI kernel's instructions: not worth measuring
BSR_MAX_BLOCK_DENSITY = 0.5
# Part of every cache key: bump when the int8 kernels change
INT8_REVISION = "int8-1"


def check_tolerance(tol) -> float | None:
    """``int8_tolerance`` as a float, or ``None``; anything else is a ``ConfigError``."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) \
            or tol < 0:  # fmt: skip
        raise ConfigError(f"int8_tolerance={tol!r}: give the largest relative output error "
                          f"allowed per layer, a float >= 0 (e.g. 0.02), or None")  # fmt: skip
    return float(tol)


def block_density(wq: np.ndarray) -> float:
    """Fraction of the 1×4 blocks (along K, K padded to 4) of ``wq[N, K]`` holding a nonzero.

    >>> block_density(np.array([[1, 0, 0, 0, 0, 0, 0, 0]], np.int8))
    0.5
    """
    n, k = wq.shape
    full = np.zeros((n, pad_k(k)), bool)
    full[:, :k] = wq != 0
    return float(full.reshape(n, -1, 4).any(axis=2).mean()) if full.size else 1.0


def _cache_path() -> Path:
    env = os.environ.get("GRAPHPRUNE_INT8_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "graphprune" / "int8_kernels.json"


class Int8Chooser:
    """``chooser(name, w, wq, spec, batch) -> (kind, record)`` for one Linear (``w`` the float
    weight ``[N, K]`` as compiled, ``wq`` its int8 values). ``probe(w, batch, kind, spec)``
    returns the one-layer model built as ``kind`` (``"fp32"``, ``"int8"``, ``"int8_bsr"``),
    ready to time:
    ``(vm, args)`` (given by :mod:`.quant_rewrite`, which owns the rewriting)."""

    def __init__(self, target, isa: str, kernels: str, tolerance: float | None, probe,
                 progress=None):  # fmt: skip
        self.target, self.isa, self.kernels, self.tol = target, isa, kernels, tolerance
        self.probe = probe
        self.step = progress or (lambda msg: None)
        self.path = _cache_path()

    def __call__(self, name: str, w: np.ndarray, wq: np.ndarray, spec, batch: int):
        rec = {"rel_error": spec.rel_error, "int8_tolerance": self.tol}
        if self.tol is not None:
            if spec.rel_error is None:
                raise ConfigError(
                    f"int8_tolerance={self.tol}: the quantization spec of {name!r} has no "
                    f"measured error; quantize with calib= (gp.quantize measures each layer's "
                    f"error on it) or compile without int8_tolerance")  # fmt: skip
            if spec.rel_error > self.tol:
                return "fp32", {**rec, "reason": (
                    f"int8 error {spec.rel_error:.4g} on the calibration data > int8_tolerance "
                    f"{self.tol:g}: computed in fp32 on its weight as quantized (int8 grid), its "
                    f"input not quantized")}  # fmt: skip
        if self.kernels not in ("auto", "bsr"):
            return "int8", rec
        bd = block_density(wq)
        bsr_fits = self.isa in ("amx", "vnni") and bd <= BSR_MAX_BLOCK_DENSITY
        rec["block_density"] = round(bd, 4)
        if self.kernels == "bsr":
            if bsr_fits:
                return "int8_bsr", rec
            return "int8", {**rec, "reason": (
                f"kernels='bsr': {bd:.0%} of the 1x4 blocks hold a nonzero (int8 block-sparse "
                f"only at <= {BSR_MAX_BLOCK_DENSITY:.0%}, on AVX-512 VNNI): int8 dense")}
        kinds = ["fp32", "int8"] + (["int8_bsr"] if bsr_fits else [])
        density = float(np.count_nonzero(wq) / max(wq.size, 1))
        key = (f"{self.target}|{INT8_REVISION}|{wq.shape[0]}x{wq.shape[1]}|b{batch}|"
               f"{spec.scheme}|{self.isa}|bd{bd:.2f}|d{density:.2f}|{','.join(kinds)}")  # fmt: skip
        cache = self._load()
        hit = cache.get(key)
        if hit is None:
            self.step(f"kernels='auto': timing {name} ({wq.shape[0]}x{wq.shape[1]}, batch "
                      f"{batch}) as {', '.join(kinds)}")  # fmt: skip
            hit = self._measure(w, batch, kinds, spec)
            cache = self._load()
            cache[key] = hit
            self._save(cache)
        rec = {**rec, "times_ms": hit["times_ms"], "cache_key": key}
        if hit["choice"] == "fp32":  # faster, not more accurate: same inputs as int8 would see
            rec["input"] = "fake-quantized"
        return hit["choice"], rec

    def _measure(self, w: np.ndarray, batch: int, kinds: list[str], spec,
                 rounds: int = 3) -> dict:  # fmt: skip
        from graphprune.codegen.sparse_rewrite import warm_ms

        probes = {kind: self.probe(w, batch, kind, spec) for kind in kinds}
        times = {kind: float("inf") for kind in kinds}
        for _ in range(rounds):  # interleaved: a burst of load hits every candidate
            for kind, (vm, args) in probes.items():
                times[kind] = min(times[kind], warm_ms(vm, args, repeat=1))
        best = min(times, key=times.get)
        return {"choice": best, "times_ms": {k: round(t, 4) for k, t in times.items()}}

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, cache: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: the decision is only not remembered
            pass
