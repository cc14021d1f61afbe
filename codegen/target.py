"""Compilation targets: turn ``"llvm"`` / ``"cuda"`` (or a dict) into a ``tvm.target.Target``.

This TVM wheel silently downgrades ``mcpu="native"`` to a generic CPU (no AVX), so for ``llvm``
we read the feature flags from ``/proc/cpuinfo`` and name an explicit ``mcpu``; ``num-cores`` is
set too because MetaSchedule and our thread count need it. CUDA targets get an ``arch``
(default ``sm_80``) and an llvm host. :func:`check_device` runs before any build, so that a
CUDA artifact meant to be loaded here is refused at once on a machine without a CUDA device.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from graphprune.ir.errors import ConfigError

__all__ = ["check_device", "detect_mcpu", "make_target", "target_to_dict"]

# First match wins: the newest ISA extension the flags prove, mapped to an LLVM CPU name.
_X86_MCPU = [
    ({"avx512f", "amx_tile", "avx512_fp16"}, "sapphirerapids"),
    ({"avx512f", "avx512_vnni", "avx512_bf16"}, "cooperlake"),
    ({"avx512f", "avx512vbmi", "avx512_vnni"}, "icelake-server"),
    ({"avx512f", "avx512_vnni"}, "cascadelake"),
    ({"avx512f", "avx512bw", "avx512vl"}, "skylake-avx512"),
    ({"avx2", "fma"}, "haswell"),
    ({"avx"}, "sandybridge"),
    ({"sse4_2"}, "nehalem"),
]


# AMD by ``cpu family`` (Zen 3/4 share 0x19; Zen 4 is the one with AVX-512). Naming an Intel
# core on an AMD one gets the right ISA but Intel's scheduling model (and, for cooperlake,
# a CPU our vector-width table did not know): the dense GEMMs ran 128-bit on a Zen 5.
_AMD_MCPU = [(0x1A, {"avx512f"}, "znver5"), (0x19, {"avx512f"}, "znver4"), (0x19, set(), "znver3"),
             (0x17, set(), "znver2")]  # fmt: skip


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _cpu_flags() -> set[str]:
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def detect_mcpu(flags: set[str] | None = None, vendor: str = "", family: int | None = None) -> str:
    """Name the LLVM ``mcpu`` for this machine's CPU from its vendor, family and feature flags.

    Examples
    --------
    >>> detect_mcpu({"avx2", "fma", "sse4_2"})
    'haswell'
    >>> detect_mcpu({"avx512f", "avx2", "fma"}, vendor="AuthenticAMD", family=0x1A)
    'znver5'
    """
    if flags is None:
        info = _cpuinfo()
        flags = _cpu_flags()
        vendor = vendor or info.get("vendor_id", "")
        if family is None and info.get("cpu family", "").isdigit():
            family = int(info["cpu family"])
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neoverse-n1" if "asimddp" in flags else "generic"
    if vendor == "AuthenticAMD" and family is not None:
        for fam, needed, name in _AMD_MCPU:
            if family == fam and needed <= flags:
                return name
    for needed, name in _X86_MCPU:
        if needed <= flags:
            return name
    return "x86-64" if machine in ("x86_64", "amd64") else "generic"


def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_target(target="llvm", *, arch: str | None = None):
    """Build a ``tvm.target.Target`` from ``"llvm"``, ``"cuda"`` or a target dict.

    ``"llvm"`` becomes ``{"kind": "llvm", "mcpu": <detected>, "num-cores": <affinity>}``;
    ``"cuda"`` becomes ``{"kind": "cuda", "arch": arch or "sm_80"}`` with an llvm host.
    """
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        spec = {k: v for k, v in target.items() if k != "str"}  # a manifest's target_to_dict
    elif isinstance(target, str):
        kind = target.split()[0]
        if kind == "llvm":
            spec = {"kind": "llvm", "mcpu": detect_mcpu(), "num-cores": _num_cores()}
        elif kind == "cuda":
            spec = {"kind": "cuda", "arch": arch or "sm_80"}
        else:
            raise ConfigError(f"unknown target {target!r}: use 'llvm', 'cuda' or a target dict")
    else:
        raise ConfigError(f"target must be a string, dict or tvm Target, not {type(target)}")
    if spec.get("mcpu") == "native":
        spec["mcpu"] = detect_mcpu()
    try:
        if spec["kind"] == "cuda":
            host = {"kind": "llvm", "mcpu": detect_mcpu(), "num-cores": _num_cores()}
            return tvm.target.Target(spec, host=host)
        return tvm.target.Target(spec)
    except Exception as e:  # TVM raises its own error types for bad dicts
        raise ConfigError(f"invalid target {spec!r}: {e}") from e


def target_to_dict(target) -> dict:
    """A JSON-able description of ``target`` for the manifest."""
    out = {"kind": target.kind.name, "str": str(target)}
    for key in ("mcpu", "arch", "num-cores"):
        if key in target.attrs:
            value = target.attrs[key]
            out[key] = int(value) if key == "num-cores" else str(value)
    return out


def check_device(target, load: bool = True) -> None:
    """Refuse, before anything is built, a CUDA artifact that would be loaded on a machine
    without a CUDA device; ``load=False`` (build and write only) is always allowed.

    ``target`` is a ``tvm.target.Target`` (:func:`make_target`). A CUDA build itself needs no
    GPU: the library carries CUDA source that is compiled when it is loaded on one.
    """
    if target.kind.name != "cuda" or not load:
        return
    import tvm

    try:
        present = bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - a TVM without the CUDA runtime raises instead
        present = False
    if not present:
        raise ConfigError(
            "target='cuda': there is no CUDA device on this machine (tvm.cuda(0) does not "
            "exist), so the artifact could not be loaded here. Pass load=False to build and "
            "write it without loading it (then load it with graphprune.load on a machine with "
            "an NVIDIA GPU), or use target='llvm'"
        )
