"""Our CPU schedules on an AVX2-only target (issue 16: "check the generated code builds and runs
for ``-mcpu`` of an AVX2 part").

The machines this runs on have AVX-512 (AMD Zen 4/5, Intel Sapphire Rapids), which execute AVX2
code, so a build for ``mcpu=haswell`` can be run here: it must match PyTorch as the native build
does, and its machine code must not use a 512-bit register (a schedule that hard-coded 16 fp32
lanes would vectorise for zmm registers that an AVX2 part does not have, and LLVM would either
split every vector op in two or, with a raw intrinsic, emit an instruction the part cannot run).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from torch import nn

from graphprune import codegen
from graphprune.codegen.cpu_rules import vector_lanes
from graphprune.codegen.target import make_target

HASWELL = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


class ConvGemm(nn.Module):
    """conv3x3 + BN + ReLU, depthwise conv, conv1x1 with a residual add, then a Linear head:
    the three conv forms and the GEMM our rules schedule, at widths that are not a multiple
    of 8 lanes (20, 12) as well as ones that are (16, 32)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())  # fmt: skip
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 20, 1)
        self.back = nn.Conv2d(20, 16, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(),
                                  nn.Linear(32, 12))  # fmt: skip

    def forward(self, x):
        y = self.stem(x)
        y = y + self.back(torch.relu(self.pw(self.dw(y))))
        return self.head(y)


def _model():
    torch.manual_seed(0)
    model = ConvGemm().eval()
    bn = model.stem[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(2, 3, 8, 8),)


def test_haswell_target_has_eight_lanes():
    assert vector_lanes(make_target(HASWELL)) == 8
    assert vector_lanes(make_target({**HASWELL, "mcpu": "skylake-avx512"})) == 16


@pytest.fixture(scope="module")
def haswell_build(tmp_path_factory):
    model, inputs = _model()
    art = codegen.compile(model, inputs, target=HASWELL,
                          out_dir=tmp_path_factory.mktemp("avx2") / "artifact")  # fmt: skip
    return model, inputs, art


def test_conv_gemm_built_for_avx2_runs_here_and_matches_torch(haswell_build):
    model, inputs, art = haswell_build
    assert art.manifest["target"]["mcpu"] == "haswell"
    assert_matches(art(*inputs), torch_outputs(model, inputs))
    ours = [rec for rec in art.manifest["kernels"].values() if rec.get("rule") == "Contraction"]
    assert ours, f"no kernel was scheduled by our GEMM/conv rule: {art.manifest['kernels']}"
    # 8 fp32 lanes (256 bits) at most; narrower where the channel count asks (20 = 5 x 4)
    assert max(rec["vector_lanes"] for rec in ours) == 8, ours


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_avx2_build_uses_ymm_and_never_zmm(haswell_build):
    art = haswell_build[2]
    lib = art.path / art.manifest["library"]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert re.search(r"\bymm\d+", asm), "no 256-bit vector code in the AVX2 build"
    zmm = [line.strip() for line in asm.splitlines() if re.search(r"\bzmm\d+", line)]
    assert not zmm, f"AVX-512 instructions in a haswell build: {zmm[:5]}"
