"""Relax sparse rewrite and ``compile(..., kernels=...)`` against the masked PyTorch model.

Oracle: the sparsified (masked, exact zeros) torch model in fp32; tolerance atol=rtol=1e-4
(sparse kernels sum in a different order than dense ones).
"""

import io

import numpy as np
import pytest
import torch
from codegen_helpers import artifact_ms, check_auto_decisions, sparse_records

from graphprune.codegen import compiler
from graphprune.codegen.lower import lower
from graphprune.codegen.sparse_rewrite import detect_block, detect_nm, rewrite_sparse
from graphprune.codegen.target import make_target
from graphprune.ir.errors import ConfigError

TARGET = make_target("llvm")


def masked_mlp(pattern: str, seed: int = 0):
    """Linear 64→48, ReLU, Linear 48→32 (no bias), weights masked with ``pattern``."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32, bias=False)
    ).eval()
    with torch.no_grad():
        for lin in (m[0], m[2]):
            w = lin.weight
            if pattern == "unstructured":
                keep = torch.rand_like(w) < 0.2
            elif pattern == "2:4":
                g = torch.rand(w.shape[0], w.shape[1] // 4, 4).argsort(dim=2).argsort(dim=2)
                keep = (g < 2).reshape(w.shape)
            else:  # block 4x4
                keep = (torch.rand(w.shape[0] // 4, w.shape[1] // 4) < 0.3).repeat_interleave(
                    4, 0
                ).repeat_interleave(4, 1)
            w.mul_(keep.float())
    return m


def onnx_proto(model, x):
    import onnx

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def run_lowered(lowered):
    import tvm
    from tvm import relax

    from graphprune.codegen.build import build

    built = build(lowered, TARGET)
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    return built, vm


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
@pytest.mark.parametrize(("kernels", "pattern"), [("csr", "unstructured"), ("bsr", "block"),
                                                  ("nm", "2:4")])  # fmt: skip
def test_forced_format_matches_masked_model(frontend, kernels, pattern):
    import tvm

    model = masked_mlp(pattern)
    x = torch.randn(2, 3, 64)
    want = model(x).detach().numpy()
    src = model if frontend == "torch" else onnx_proto(model, x)
    lowered = lower(src, (x,) if frontend == "torch" else (x.numpy(),))
    new, records = rewrite_sparse(lowered, TARGET, kernels, cache_path=False)
    assert [r["sparsity"] for r in records.values()] == [kernels, kernels]
    # the dense weights are gone, compressed arrays (with integer indices) took their place
    assert len(new.params) > len(lowered.params) - 2
    assert any(p.dtype.kind in "iu" for p in new.params)
    dense = [id(w) for w in lowered.params if w.ndim == 2]
    assert not any(id(p) in dense for p in new.params)
    built, vm = run_lowered(new)
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in built.weights])
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_nm_refuses_unstructured_weight_and_records_why():
    model = masked_mlp("unstructured")
    lowered = lower(model, (torch.randn(2, 64),))
    new, records = rewrite_sparse(lowered, TARGET, "nm", cache_path=False)
    assert all(r["sparsity"] == "dense" and "N:M" in r["reason"] for r in records.values())
    assert new is lowered


def test_dense_weights_are_left_alone_by_auto(tmp_path):
    model = torch.nn.Linear(16, 8).eval()
    lowered = lower(model, (torch.randn(2, 16),))
    new, records = rewrite_sparse(lowered, TARGET, "auto", cache_path=tmp_path / "c.json")
    assert new is lowered
    assert "density 1.00" in next(iter(records.values()))["reason"]


def test_pattern_detection():
    w = np.kron(np.eye(3), np.ones((4, 4)))
    assert detect_block(w) == (4, 4)
    assert detect_nm(np.array([[1.0, 0, 0, 2.0] * 4])) == (2, 4)
    assert detect_nm(np.ones((2, 8))) is None


def test_bad_kernels_option():
    lowered = lower(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    with pytest.raises(ConfigError, match="kernels must be one of"):
        rewrite_sparse(lowered, TARGET, "fastest")


def test_compile_auto_vit_tiny_matches_masked_model(tmp_path, monkeypatch):
    """End to end: sparsified ViT (90% unstructured) compiled with kernels="auto"; the
    decisions and their timings are in the manifest and in the on-disk cache, and a second
    compile reuses the cache."""
    import graphprune.models as zoo
    from graphprune.api.sparsify import sparsify

    cache = tmp_path / "kernel_cache.json"
    monkeypatch.setenv("GRAPHPRUNE_KERNEL_CACHE", str(cache))
    model, inputs = zoo.get("vit_tiny")
    sparse = sparsify(model, inputs, sparsity=0.9, pattern="unstructured").model.eval()
    want = sparse(*inputs).detach().numpy()
    art = compiler.compile(sparse, inputs, out_dir=tmp_path / "vit", kernels="auto")
    np.testing.assert_allclose(art(*inputs), want, rtol=1e-4, atol=1e-4)
    records = sparse_records(art)
    assert records, "no Linear was considered"
    measured = check_auto_decisions(art, cache)  # the artifact runs what was recorded and cached
    assert all("csr" in r["times_ms"] for r in measured)
    art2 = compiler.compile(sparse, inputs, out_dir=tmp_path / "vit2", kernels="auto")
    again = sparse_records(art2)
    assert [r["sparsity"] for r in again.values()] == [r["sparsity"] for r in records.values()]
    assert [r["times_ms"] for r in again.values() if "times_ms" in r] == [
        r["times_ms"] for r in measured
    ]  # read back from the cache, not measured again


def test_compile_forced_csr_artifact_round_trip(tmp_path):
    """compile(kernels="csr") ships the compressed arrays (int16 indices) in weights.npz and
    the reloaded artifact still matches the masked model."""
    from graphprune.runtime import load

    model = masked_mlp("unstructured")
    x = torch.randn(4, 64)
    art = compiler.compile(model, (x,), out_dir=tmp_path / "mlp", kernels="csr")
    kinds = [v["sparsity"] for k, v in art.manifest["kernels"].items() if k.startswith("sparse:")]
    assert kinds == ["csr", "csr"]
    again = load(tmp_path / "mlp")
    np.testing.assert_allclose(again(x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    with np.load(tmp_path / "mlp" / art.manifest["weights"]) as w:
        assert any(w[name].dtype == np.int16 for name in w.files)


def masked_convnet(seed: int = 0):
    """conv1x1 8→16 (stride 2), ReLU, conv3x3 16→12 (pad 1, dilation 2), ReLU, conv1x1 12→8
    (no bias); every weight 75% unstructured-sparse, so each conv is a rewrite candidate."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 12, 3, padding=1, dilation=2), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 8, 1, bias=False),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for conv in (m[0], m[2], m[4]):
            conv.weight.mul_((torch.rand_like(conv.weight) < 0.25).float())
    return m


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
@pytest.mark.parametrize(("kernels", "images"), [("csr", 1), ("csr", 2), ("bsr", 1)])
def test_conv_rewrite_matches_masked_model(frontend, kernels, images):
    """1×1 convs (direct, strided) and an im2col'd 3×3 conv (padded, dilated) go through the
    matrix kernels for both importers' graphs, one image and several."""
    import tvm

    model = masked_convnet()
    x = torch.randn(images, 8, 11, 9)
    want = model(x).detach().numpy()
    src = model if frontend == "torch" else onnx_proto(model, x)
    lowered = lower(src, (x,) if frontend == "torch" else (x.numpy(),))
    new, records = rewrite_sparse(lowered, TARGET, kernels, cache_path=False)
    assert [r["sparsity"] for r in records.values()] == [kernels] * 3
    assert all(r["layer"].startswith("conv") for r in records.values())
    assert not any(w.ndim == 4 for w in new.params)  # every conv weight was replaced
    built, vm = run_lowered(new)
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in built.weights])
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_conv_auto_times_the_dense_conv(tmp_path):
    """auto's probe for a conv is the conv itself: each of the three convs' records carries its
    geometry and the dense conv's timing; the rewritten module runs exactly the sparse kernels
    the records name, and equals the masked model."""
    import tvm

    model = masked_convnet()
    x = torch.randn(1, 8, 11, 9)
    lowered = lower(model, (x,))
    new, records = rewrite_sparse(lowered, TARGET, "auto", cache_path=tmp_path / "c.json")
    assert len(records) == 3
    for r in records.values():
        assert r["layer"].startswith("conv") and r["cache_key"].count("conv") == 1
        assert {"dense", "csr"} <= set(r["times_ms"])
    kernels = sorted(gv.name_hint for gv in new.mod.get_global_vars()
                     if gv.name_hint.startswith("sparse_"))  # fmt: skip
    n_k = [tuple(r["shape"]) for r in records.values() if r["sparsity"] != "dense"]
    assert len(kernels) == len(n_k)
    assert all(any(f"conv_{n}x{k}_b" in name for name in kernels) for n, k in n_k)
    built, vm = run_lowered(new)
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in built.weights])
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("n", "k", "batch", "density", "sparse_wins"),
    [(1024, 1024, 1, 0.05, True), (512, 512, 64, 0.6, False)],
    ids=["95pct-sparse-b1", "60pct-dense-b64"],
)  # fmt: skip
def test_auto_decides_what_a_separate_measurement_confirms(
    tmp_path, monkeypatch, n, k, batch, density, sparse_wins
):
    """Layers whose answer is not close: a 95%-sparse 1024x1024 Linear at batch 1 is memory
    bound, CSR reads ~8% of the dense bytes (measured ~7x faster than dense on an AVX-512 VM);
    a 60%-dense 512x512 at batch 64 is compute bound, where dense GEMM beats CSR's gathers
    (~2x). auto must pick sparse for the first and dense for the second, and the artifacts,
    timed apart from auto's probes, confirm it: the artifact auto built is not slower than the
    alternative beyond noise (25%)."""
    monkeypatch.setenv("GRAPHPRUNE_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    rng = np.random.default_rng(0)
    lin = torch.nn.Linear(k, n, bias=False).eval()
    with torch.no_grad():
        lin.weight.mul_(torch.from_numpy((rng.random((n, k)) < density).astype(np.float32)))
    x = torch.randn(batch, k)
    auto = compiler.compile(lin, (x,), out_dir=tmp_path / "auto", kernels="auto")
    (record,) = sparse_records(auto).values()
    assert "times_ms" in record, record  # measured, not excluded by density
    assert (record["sparsity"] != "dense") is sparse_wins, record
    other_kernels = "dense" if sparse_wins else "csr"
    other = compiler.compile(lin, (x,), out_dir=tmp_path / "other", kernels=other_kernels)
    np.testing.assert_allclose(auto(x), other(x), rtol=1e-4, atol=1e-4)
    ms = {"auto": [], "other": []}
    for _ in range(3):  # interleaved, so a burst of load on the shared cores hits both
        ms["auto"].append(artifact_ms(auto, (x,)))
        ms["other"].append(artifact_ms(other, (x,)))
    assert min(ms["auto"]) <= 1.25 * min(ms["other"]), (record, ms)


@pytest.mark.parametrize("images", [1, 2])
def test_patch_embedding_conv_rewrite(images):
    """A ViT patch embedding (4×4 conv, stride 4, input not a multiple of the patch) takes the
    reshape + transpose im2col."""
    import tvm

    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 16, 4, stride=4).eval()
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    x = torch.randn(images, 3, 18, 13)
    new, records = rewrite_sparse(lower(conv, (x,)), TARGET, "csr", cache_path=False)
    assert [r["sparsity"] for r in records.values()] == ["csr"]
    text = new.mod["main"].script()
    assert "strided_slice" in text and "concat" not in text
    built, vm = run_lowered(new)
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in built.weights])
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_allclose(out.numpy(), conv(x).detach().numpy(), rtol=1e-4, atol=1e-4)
