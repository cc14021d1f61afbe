"""M-blocks of rows in the K-blocked GEMM schedule (issue 16, thread balance and L2 reuse).

The K-blocked contraction used to run only its output-channel panels in parallel: a layer with
one or three panels left a core idle on 2 threads, and every panel re-read the whole activation.
:func:`graphprune.codegen.cpu_blocking.row_blocks` splits the rows into blocks and the rule runs
(panel, block) pairs in parallel. Checked on the decision, on the schedule the rule produces
(the parallel loop's extent) for AVX-512 and AVX2 targets, then compiled against PyTorch
(atol=rtol=1e-4).
"""

from __future__ import annotations

import re

import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import seeded
from graphprune.codegen.cpu_blocking import L2_ROW_BLOCK_BYTES, row_blocks
from graphprune.codegen.cpu_rules import Contraction
from graphprune.codegen.target import make_target
from torch import nn
from tvm import te

from graphprune import codegen

AVX512 = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


@pytest.mark.parametrize(
    "rows, rt, k, panels, blocks",
    [
        (128, 4, 3072, 16, 4),  # BERT-base FFN down, seq 128: 1.5 MiB of rows -> 4 x 384 KiB
        (128, 8, 768, 32, 1),  # FFN up: 384 KiB fits, 32 panels keep 2 threads busy
        (128, 8, 768, 3, 2),  # a pruned width of 3 panels: 6 pairs, 3 per thread
        (64, 8, 768, 1, 2),  # one panel: two blocks, not one serial panel
        (16, 4, 768, 1, 1),  # 4 row tiles: too few to split
        (49, 7, 2048, 8, 1),  # 7x7 conv output: 7 row tiles, none to spare
    ],
)  # fmt: skip
def test_row_blocks_decision(rows, rt, k, panels, blocks):
    assert row_blocks(rows, rt, k, panels) == blocks
    if blocks > 1:  # whole register tiles per block, and the block's rows sized for L2
        assert (rows // rt) % blocks == 0 and rows // blocks * k * 4 <= L2_ROW_BLOCK_BYTES


def _matmul(m, k, n):
    """``C[m, n] = A[m, k] @ W[k, n]``, ``W`` marked as a weight (packed by the rule)."""
    a = te.placeholder((m, k), name="A")
    w = te.placeholder((k, n), name="W")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name="C")
    return te.create_prim_func([a, w, c]).with_attr("layout_free_buffers", [1])


@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
@pytest.mark.parametrize("shape", [(128, 3072, 768), (64, 768, 48), (128, 768, 144)])
def test_parallel_loop_runs_panels_times_blocks(target, shape):
    m, k, n = shape
    rule = Contraction()
    sch = rule.apply(_matmul(m, k, n), make_target(target), False)
    info = rule.last_match
    assert sch is not None and info.k_block, info
    rt, ct, lanes = info.tile
    panels = n // (ct * lanes)
    assert info.row_blocks == row_blocks(m, rt, k, panels)
    assert re.findall(r"T\.parallel\((\d+)\)", sch.mod.script()) == [str(panels * info.row_blocks)]
    if target is AVX512:
        # what the rule picks on the project's AVX-512 machines (16 lanes, 24 accumulators)
        assert (info.tile, info.row_blocks) == {
            (128, 3072, 768): ((4, 6, 16), 4),
            (64, 768, 48): ((8, 3, 16), 2),
            (128, 768, 144): ((8, 3, 16), 2),
        }[shape]
    # an even parallel extent: 2 threads split it without a serial tail
    assert panels * info.row_blocks % 2 == 0


class NarrowFFN(nn.Module):
    """Linear 768 -> 48 (one panel: K-blocked, two M-blocks) + GELU + Linear 48 -> 768."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(768, 48)
        self.down = nn.Linear(48, 768)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


class ResidualLinear(nn.Module):
    """Linear 768 -> 48 with a residual add in its epilogue (read per row block)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(768, 48)

    def forward(self, x, r):
        return self.fc(x) + r


@pytest.mark.parametrize("case", ["gelu", "residual"])
def test_row_blocked_linear_matches_torch(artifact_dir, case):
    if case == "gelu":
        model, inputs = seeded(NarrowFFN), (torch.randn(64, 768),)
    else:
        model, inputs = seeded(ResidualLinear), (torch.randn(64, 768), torch.randn(64, 48))
    art = codegen.compile(model, inputs, out_dir=artifact_dir)
    up = [v for v in art.manifest["kernels"].values() if v.get("reduce") == [768]]
    assert len(up) == 1 and up[0]["k_block"], art.manifest["kernels"]
    panels = 48 // (up[0]["tile_col_vectors"] * up[0]["vector_lanes"])
    assert row_blocks(64, up[0]["tile_rows"], 768, panels) > 1  # the blocked path ran
    assert_matches(art(*inputs), torch_outputs(model, inputs))


class ConvBN(nn.Module):
    """ResNet-50's stage-2 1x1 reduction with its BatchNorm: K-blocked, row-blocked, with an
    epilogue computed once per (panel, block)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(512, 128, 1, bias=False)
        self.bn = nn.BatchNorm2d(128)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_row_blocks_are_boxes_of_the_row_axes():
    """7 blocks of 224 rows of a 2 x 28 x 28 output: one straddles the two images, and TVM gave
    its epilogue the bounding box of both (rows another thread was still accumulating: ResNet-50
    at batch 2+ was off by up to 0.9). Only blocks that are boxes are offered."""
    assert row_blocks(1568, 4, 512, 2) == 7  # without the extents, the straddling split
    blocks = row_blocks(1568, 4, 512, 2, row_extents=[2, 28, 28])
    assert blocks > 1 and (1568 // blocks) % 28 == 0 and 784 % (1568 // blocks) == 0


def test_batched_conv_epilogue_with_row_blocks_matches_torch(artifact_dir):
    model = seeded(ConvBN).eval()
    with torch.no_grad():  # BN statistics that are not the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    inputs = (torch.randn(2, 512, 28, 28),)
    art = codegen.compile(model, inputs, out_dir=artifact_dir)
    conv = [v for v in art.manifest["kernels"].values() if v.get("reduce") == [1, 1, 512]]
    assert len(conv) == 1 and conv[0]["k_block"] and conv[0]["row_blocks"] > 1, conv
    assert_matches(art(*inputs), torch_outputs(model, inputs))


@pytest.mark.parametrize("shape, parallel", [((8, 64, 64), False), ((64, 256, 256), True)])
def test_small_contractions_run_serially(shape, parallel):
    """Under MIN_PARALLEL_WORK multiply-adds the fork-join would cost more than the kernel saves:
    no parallel loop (8 x 64 x 64 = 32 K MACs); a 4 M MAC GEMM keeps its parallel panels."""
    from graphprune.codegen.cpu_loops import MIN_PARALLEL_WORK

    m, k, n = shape
    assert (m * k * n >= MIN_PARALLEL_WORK) == parallel
    sch = Contraction().apply(_matmul(m, k, n), make_target(AVX512), False)
    assert sch is not None
    assert ("T.parallel" in sch.mod.script()) == parallel
