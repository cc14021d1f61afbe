"""Shared helpers for codegen tests: compare compiled outputs with PyTorch."""

from __future__ import annotations

import numpy as np
import torch

from graphprune.frontends.torch.outputs import flatten_outputs

# fp32 kernels reorder sums (tiling, vector lanes): errors grow with the reduction length.
ATOL = 1e-4
RTOL = 1e-4


def torch_outputs(model, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in flatten_outputs(model(*inputs))]


def assert_matches(art_out, ref: list[np.ndarray], atol=ATOL, rtol=RTOL) -> None:
    outs = list(art_out) if isinstance(art_out, tuple) else [art_out]
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def sparse_records(art) -> dict[str, dict]:
    """The manifest's sparse-rewrite records, ``{"sparse:<weight>": record}``."""
    return {k: v for k, v in art.manifest["kernels"].items() if k.startswith("sparse:")}


def _kernel_name(record: dict, fmt: str) -> str:
    n, k = record["shape"]
    return f"sparse_{fmt}{'conv' if 'layer' in record else ''}_{n}x{k}_b{record['batch']}"


def check_auto_decisions(art, cache) -> list[dict]:
    """The decisions ``kernels="auto"`` recorded are the ones the artifact runs and the cache
    stores: every record choosing a sparse format has its kernel in the compiled library, no
    record choosing dense has one (unless another layer of that shape chose one), and each
    measured record's cache entry names the same choice. Returns the measured records.

    With the artifact's outputs compared to the masked model, this checks that the output of
    the recorded decisions is the masked dense math."""
    import json

    import tvm

    records = list(sparse_records(art).values())
    measured = [r for r in records if "times_ms" in r]
    assert measured, f"no layer was measured: {records}"
    stored = json.loads(cache.read_text())
    for r in measured:
        assert {"dense", r["sparsity"]} <= set(r["times_ms"]), r
        assert stored[r["cache_key"]]["choice"] == r["sparsity"], r
    lib = tvm.runtime.load_module(str(art.path / art.manifest["library"]))

    def compiled(name: str) -> bool:
        return any(m.implements_function(name) for m in [lib, *lib.imports])

    chosen = {_kernel_name(r, r["sparsity"]) for r in records if r["sparsity"] != "dense"}
    for r in records:
        if r["sparsity"] != "dense":
            assert compiled(_kernel_name(r, r["sparsity"])), f"recorded {r} but not compiled"
        else:
            for fmt in ("csr", "bsr", "nm"):
                name = _kernel_name(r, fmt)
                assert name in chosen or not compiled(name), f"recorded dense, runs {name}"
    return measured


def artifact_ms(art, inputs, rounds: int = 3) -> float:
    """Milliseconds per call of the artifact's ``main``, measured apart from ``auto``'s
    probes: the shipped library and weights on a fresh VM, best of ``rounds`` means of 20 ms
    of back-to-back calls."""
    import tvm
    from tvm import relax

    man = art.manifest
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art.path / man["library"])), tvm.cpu())
    with np.load(art.path / man["weights"]) as w:
        params = [tvm.runtime.tensor(w[k]) for k in man["weight_names"]]
    args = [tvm.runtime.tensor(np.ascontiguousarray(np.asarray(x))) for x in inputs] + params
    ev = vm.time_evaluator(man["entry"], tvm.cpu(), number=10, repeat=rounds, min_repeat_ms=20)
    return 1e3 * float(min(ev(*args).results))
