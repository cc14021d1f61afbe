"""CUDA target: the dlight-scheduled build's CUDA C++ assembles with nvcc for sm_80 and sm_90.

There is no GPU here; the .so carries CUDA source compiled at load time, so a build alone proves
nothing about PTX. ``nvcc -cubin`` proves it assembles; running it needs the lent GPU machine.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from codegen_models import Attention, ConvBlock, seeded

from graphprune.codegen.lower import lower_torch
from graphprune.codegen.build import build
from graphprune.codegen.target import make_target

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def _cuda_source(executable) -> str:
    def walk(mods):
        for m in mods:
            yield m
            yield from walk(m.imports)

    (cuda,) = [m for m in walk(executable.mod.imports) if m.kind == "cuda"]
    return cuda.inspect_source()


@pytest.mark.parametrize("name", ["convblock", "attention"])
def test_cuda_source_assembles(name, tmp_path):
    model, x = (
        (seeded(ConvBlock), torch.randn(2, 3, 16, 16))
        if name == "convblock"
        else (seeded(Attention), torch.randn(2, 10, 32))
    )
    built = build(lower_torch(model, (x,)), make_target("cuda"))
    src = tmp_path / "kernels.cu"
    src.write_text(_cuda_source(built.executable))
    for arch in ("sm_80", "sm_90"):
        out = tmp_path / f"k_{arch}.cubin"
        proc = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-o", str(out), str(src)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert out.stat().st_size > 0
