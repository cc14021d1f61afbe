"""The CPU schedule's choices (weight packing, GEMM k-blocking, register tiles, fast math) and
the numbers they produce against PyTorch (atol=rtol=1e-4, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import ConvBlock, seeded
from torch import nn

from graphprune import codegen
from graphprune.codegen.cpu_tiles import k_block, register_tile, row_tile_fits


class MLP(nn.Module):
    """Linear (K=256: the weight panel exceeds L1, so k-blocked) + GELU + Linear."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 96)
        self.down = nn.Linear(96, 40)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize(
    "rt, extents, fits",
    [(4, [56, 56], True), (7, [7, 7], True), (14, [4, 7], True), (8, [7, 7], False),
     (8, [3136], True), (3, [2, 128], False), (256, [2, 128], True)],
)  # fmt: skip
def test_row_tile_is_a_box(rt, extents, fits):
    assert row_tile_fits(rt, extents) is fits


def test_register_tile_shapes():
    # 7x7 output, 32 channel vectors: 4 rows would cut the 7-wide rows; 7 x 2 fits the box.
    assert register_tile([1, 7, 7], 32, 24) == (7, 2)
    rt, ct = register_tile([128], 48, 24)
    assert rt * ct <= 24 and 128 % rt == 0 and 48 % ct == 0 and rt >= 4
    assert register_tile([1], 64, 24)[0] == 1  # GEMV: one row, many column vectors
    assert register_tile([128], 48, 12)[0] * register_tile([128], 48, 12)[1] <= 12


def test_k_block_only_for_long_gemm_reductions():
    # matmul [128, 768] x [768, 96]: 768 * 96 * 4 bytes > 32 KiB -> blocked, kc divides K
    kc = k_block([128, 96, 768], 2, 4, 96, 32)
    assert kc and 768 % kc == 0 and kc * 96 * 4 <= 32 * 1024
    assert k_block([128, 64, 64], 2, 4, 64, 32) is None  # panel fits L1
    assert k_block([1, 7, 7, 64, 3, 3, 512], 4, 7, 64, 32) is None  # 3x3 conv: not GEMM-like
    assert k_block([4, 1024, 4096], 2, 4, 256, 32) is None  # one row tile: no panel reuse


def test_linear_weights_are_packed_and_k_blocked(artifact_dir):
    model, inputs = seeded(MLP), (torch.randn(8, 256),)
    art = codegen.compile(model, inputs, out_dir=artifact_dir)
    assert_matches(art(*inputs), torch_outputs(model, inputs))
    kernels = art.manifest["kernels"]
    up = [v for k, v in kernels.items() if v.get("reduce") == [256]]
    assert up and up[0]["packed_weight"] and up[0]["k_block"], kernels
    # the packed panel is what ships: [N / bn, K, bn]
    bn = up[0]["tile_col_vectors"] * up[0]["vector_lanes"]
    assert [96 // bn, 256, bn] in art.manifest["weight_shapes"]
    # gelu went through the fast-math polynomials (no libm erf call left in a kernel name)
    assert any("fast_erf" in k for k in kernels), kernels


def test_structurally_pruned_model_compiles_and_matches(artifact_dir):
    import graphprune as gp

    model = seeded(ConvBlock, 16)
    res = gp.prune(model, (torch.randn(2, 3, 16, 16),), ratio=0.5, criterion="l2")
    x = (torch.randn(1, 3, 16, 16),)
    art = codegen.compile(res.model, x, out_dir=artifact_dir)
    assert_matches(art(*x), torch_outputs(res.model, x))
    dense = codegen.compile(model, x, out_dir=artifact_dir.with_name("dense"))
    assert not np.allclose(art(*x), dense(*x))  # it really is the pruned network


def test_batch_norm_epilogue_folds_to_one_multiply_and_one_add():
    """conv -> BN -> ReLU: after decomposition BN is (y - mean) * (1/std) * gamma + beta on the
    activation; the fold leaves one multiply and one add there (plus the conv's bias add), the
    rest works on [1, C, 1, 1] weight-only values."""
    import tvm
    from tvm import relax

    from graphprune.codegen.lower import lower
    from graphprune.codegen.rewrites import divide_by_weights, fold_affine_epilogues

    model = seeded(ConvBlock)
    lowered = lower(nn.Sequential(model.stem, model.bn, nn.ReLU()), (torch.randn(1, 3, 8, 8),))
    mod = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(), divide_by_weights(),
        fold_affine_epilogues(), relax.transform.LiftTransformParams(),
    ])(lowered.mod)  # fmt: skip
    on_activation = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            shape = [int(d) for d in e.ty.shape] if isinstance(e.ty, relax.TensorType) else []
            if shape == [1, 16, 8, 8] and e.op.name != "relax.nn.conv2d":
                on_activation.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    assert on_activation == ["relax.add", "relax.multiply", "relax.add", "relax.nn.relu"]


@pytest.mark.parametrize(
    "channels, wide", [(12, 16), (24, 32), (72, 80), (8, None), (48, None), (100, 112)]
)
def test_padded_width(channels, wide):
    from graphprune.codegen.pad_channels import padded_width

    assert padded_width(channels, 16) == wide


def _avx2_host() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize(
    "mcpu",
    [None, pytest.param("haswell", marks=pytest.mark.skipif(not _avx2_host(), reason="no AVX2"))],
    ids=["host", "haswell-8-lanes"],
)
def test_odd_channel_counts_are_padded_and_match_torch(tmp_path, mcpu):
    """Channel counts that waste the target's vectors (12 and 72 at 16 lanes, 6 and 36 at 8)
    run on full vectors (zero filters / zero rows added at build time) and the outputs still
    equal PyTorch's; widths with full vectors are left alone. Once for the host's lane count,
    once for 8 lanes (AVX2, runs on any AVX2 or AVX-512 host)."""
    from codegen_models import OddChannels

    from graphprune.codegen.cpu_rules import vector_lanes
    from graphprune.codegen.pad_channels import padded_width
    from graphprune.codegen.target import make_target

    spec = "llvm" if mcpu is None else {"kind": "llvm", "mcpu": mcpu}
    lanes = vector_lanes(make_target(spec))
    if mcpu is not None:
        assert lanes == 8
    cin, mid = 3 * lanes // 4, 9 * lanes // 2  # 3/4 of a vector; 4.5 vectors
    wide_cin, wide_mid = padded_width(cin, lanes), padded_width(mid, lanes)
    assert (wide_cin, wide_mid) == (lanes, 5 * lanes)  # both worth padding, at any lane count
    model = seeded(OddChannels, cin, mid)
    x = (torch.randn(1, 3, 16, 16),)
    ref = torch_outputs(model, x)
    assert np.abs(ref[0] - model.fc.bias.detach().numpy()).max() > 1e-2  # not bias alone
    art = codegen.compile(model, x, target=spec, out_dir=tmp_path / "odd")
    assert_matches(art(*x), ref)
    widths = {tuple(k["spatial"])[-1] for k in art.manifest["kernels"].values() if "spatial" in k}
    assert {wide_cin, wide_mid} <= widths and not {cin, mid} & widths
    padded = {(g["channels"], g["padded_to"]) for g in art.manifest["padded_channels"]}
    assert padded == {(cin, wide_cin), (mid, wide_mid)}
    full = codegen.compile(seeded(OddChannels, lanes, 4 * lanes), x, target=spec,
                           out_dir=tmp_path / "even")  # fmt: skip
    assert {lanes, 4 * lanes} <= {tuple(k["spatial"])[-1] for k in full.manifest["kernels"].values()
                                  if "spatial" in k}  # fmt: skip
    assert "padded_channels" not in full.manifest


def test_pruned_mobilenet_matches_torch(tmp_path):
    """A real 50% structured pruning of the zoo's MobileNetV2 (widths 24 -> 12, 144 -> 72, ...:
    the channel-padding pass widens some groups) still equals PyTorch."""
    import graphprune as gp
    from graphprune import models

    model, inputs = models.get("mobilenetv2_tiny")
    pruned = gp.prune(model.eval(), inputs, ratio=0.5, criterion="l2").model.eval()
    ref = torch_outputs(pruned, inputs)
    art = codegen.compile(pruned, inputs, out_dir=tmp_path / "mbv2")
    assert_matches(art(*inputs), ref)


def test_relu6_stays_in_the_conv_epilogue(tmp_path):
    """ReLU6 (``clip``) has no layout rule in Relax: it used to stay NCHW between two
    transposes per block. As ``minimum(maximum(x, 0), 6)`` it follows NHWC and fuses into the
    conv before it."""
    from graphprune import models

    model, inputs = models.get("mobilenetv2_tiny")
    art = codegen.compile(model.eval(), inputs, out_dir=tmp_path / "mbv2")
    assert_matches(art(*inputs), torch_outputs(model, inputs))
    names = list(art.manifest["kernels"])
    assert not [n for n in names if "clip" in n], names
    assert sum("transpose" in n for n in names) <= 2, names  # the input's NCHW -> NHWC, the last
