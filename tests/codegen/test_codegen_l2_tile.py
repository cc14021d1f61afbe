"""The register tile of a contraction whose weight panel streams from L2 (issue 16).

A kh x kw > 1 convolution gets no K-blocking, so a packed weight panel larger than L1 is re-read
from L2 by every row tile; the tile then weighs a weight-vector load ``L2_LOAD_COST`` times an
input broadcast and takes more rows, fewer column vectors. GEMM-like contractions (1x1 conv,
matmul: K-blocked into L1) and small panels (depthwise, the stem's narrow columns) keep the old
choice. Checked on the rule's decision, then on compiled convs against PyTorch (atol=rtol=1e-4),
static and with a dynamic batch.
"""

from __future__ import annotations

import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import seeded
from graphprune.codegen.cpu_loops import NOMINAL_EXTENT
from graphprune.codegen.cpu_tiles import L1_PANEL_BYTES, l2_panel_bytes, register_tile
from torch import nn

from graphprune import codegen

# ResNet-50 stage 3: 14x14 output, 256 -> 256 channels, 3x3 kernel (extents: n, h, w, c, kh, kw, ci)
CONV3X3 = [1, 14, 14, 256, 3, 3, 256]
CONV1X1 = [1, 14, 14, 256, 1, 1, 2304]  # same reduction length, GEMM-like


def _tile(extents, lanes=16, max_acc=24, rows=None):
    panel = l2_panel_bytes(extents, 4, lanes, 32)
    return register_tile(rows or extents[1:3], extents[3] // lanes, max_acc, panel)


def test_l2_panel_only_where_there_is_no_k_blocking():
    assert l2_panel_bytes(CONV3X3, 4, 16, 32) == 3 * 3 * 256 * 16 * 4 > L1_PANEL_BYTES
    assert l2_panel_bytes(CONV1X1, 4, 16, 32) == 0  # 1x1 conv: K-blocked
    assert l2_panel_bytes([128, 96, 768], 2, 16, 32) == 0  # matmul
    assert l2_panel_bytes([1, 56, 56, 64, 3, 3, 1], 4, 16, 32) < L1_PANEL_BYTES  # depthwise


def test_conv_with_l2_panel_takes_more_rows_than_the_gemm_like_case():
    # AVX-512: 2 x 8 (16 weight vectors per 2 broadcasts) for the GEMM-like shape; 7 x 2 when
    # those weight vectors come from L2.
    assert _tile(CONV1X1) == (2, 8)
    assert _tile(CONV3X3) == (7, 2)
    # ResNet-50's 56x56x64 3x3 conv and the 7x7 stem (panel over L1 only from 4 vectors on)
    assert _tile([1, 56, 56, 64, 3, 3, 64]) == (8, 2)
    assert _tile([1, 112, 112, 64, 7, 7, 3]) == (8, 2)
    assert register_tile([112, 112], 4, 24) == (4, 4)  # what it was
    # Rows planned at NOMINAL_EXTENT (a symbolic row axis innermost): 6 x 4 wins either way.
    assert _tile(CONV3X3, rows=[NOMINAL_EXTENT]) == (6, 4)
    # AVX2 (8 lanes, 12 accumulators): the tile stays within its registers.
    rt, ct = _tile(CONV3X3, lanes=8, max_acc=12)
    assert rt * ct <= 12 and 32 % ct == 0


class Conv3x3(nn.Module):
    def __init__(self, c=256):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _conv_kernel(art):
    hits = [v for v in art.manifest["kernels"].values() if v.get("reduce") == [3, 3, 256]]
    assert len(hits) == 1, art.manifest["kernels"]
    return hits[0]


def test_compiled_conv_uses_the_l2_tile_and_matches_torch(artifact_dir):
    model, x = seeded(Conv3x3), (torch.randn(1, 256, 14, 14),)
    art = codegen.compile(model, x, out_dir=artifact_dir)
    k = _conv_kernel(art)
    lanes = k["vector_lanes"]
    expected = _tile(CONV3X3, lanes, 24 if lanes >= 16 else 12)
    assert (k["tile_rows"], k["tile_col_vectors"]) == expected, k
    if lanes == 16:
        assert expected == (7, 2)
    assert_matches(art(*x), torch_outputs(model, x))


def test_dynamic_batch_conv_uses_the_same_tile_and_matches_torch(artifact_dir):
    model = seeded(Conv3x3)
    batch = torch.export.Dim("batch", min=1, max=4)
    art = codegen.compile(model, (torch.randn(2, 256, 14, 14),), out_dir=artifact_dir,
                          dynamic_shapes=({0: batch},))  # fmt: skip
    k = _conv_kernel(art)
    lanes = k["vector_lanes"]
    assert (k["tile_rows"], k["tile_col_vectors"]) == _tile(CONV3X3, lanes,
                                                            24 if lanes >= 16 else 12)  # fmt: skip
    for b in (1, 3):
        x = (torch.randn(b, 256, 14, 14, generator=torch.Generator().manual_seed(b)),)
        assert_matches(art(*x), torch_outputs(model, x))
