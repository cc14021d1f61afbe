"""``graphprune compile`` (codegen.cli.compile_main) and target detection."""

from __future__ import annotations

import json

import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import ConvBlock, seeded

from graphprune.app.cli_compile import compile_main
from graphprune.codegen.target import check_device, detect_mcpu, make_target
from graphprune.ir.errors import ConfigError
from graphprune.runtime import load


def test_cli_compiles_onnx_and_prints_summary(tmp_path, capsys):
    model, x = seeded(ConvBlock), torch.randn(2, 3, 16, 16)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    rc = compile_main([str(tmp_path / "m.onnx"), "--target", "llvm", "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0
    assert "lowering to Relax" in captured.err and "scheduling" in captured.err
    assert "Contraction" in captured.out and "model.so" in captured.out
    assert_matches(load(tmp_path / "out")(x.numpy()), torch_outputs(model, (x,)))


def test_cli_force_shape_and_created_parent(tmp_path, capsys):
    model, x = seeded(ConvBlock), torch.randn(2, 3, 8, 8)
    src, out = str(tmp_path / "m.onnx"), tmp_path / "a" / "b" / "art"
    torch.onnx.export(model, (x,), src, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})  # fmt: skip
    assert compile_main([src, "-o", str(out), "--shape", "x=2,3,8,8"]) == 0
    assert f"created directory {tmp_path / 'a'}" in capsys.readouterr().err
    assert_matches(load(out)(x.numpy()), torch_outputs(model, (x,)))
    # an existing artifact is replaced only with --force, as by prune and run
    first = (out / "manifest.json").read_text()
    rc = compile_main([src, "-o", str(out), "--shape", "x=2,3,8,8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("graphprune: error:") and "pass --force" in err
    assert (out / "manifest.json").read_text() == first
    model.stem.weight.data.mul_(2)  # a different model replaces it
    torch.onnx.export(model, (x,), src, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})  # fmt: skip
    assert compile_main([src, "-o", str(out), "--shape", "x=2,3,8,8", "--force"]) == 0
    assert_matches(load(out)(x.numpy()), torch_outputs(model, (x,)))
    assert sorted(p.name for p in out.parent.iterdir()) == ["art"]  # no staging left


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert compile_main([str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "new" / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.onnx"]  # no folder made for nothing


def test_cuda_without_a_device_is_refused_at_once_and_load_false_builds(tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    import graphprune as gp

    model, x = seeded(ConvBlock), torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="no CUDA device on this machine .* load=False"):
        gp.compile(model, (x,), target="cuda", out_dir=tmp_path / "a" / "art")
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing left
    path = gp.compile(model, (x,), target="cuda", out_dir=tmp_path / "art", load=False)
    assert path == tmp_path / "art"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "cuda" and (path / "model.so").stat().st_size > 0
    check_device(make_target("llvm"))  # CPU targets need no check


@pytest.mark.parametrize(
    "flags, mcpu",
    [({"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}, "skylake-avx512"),
     ({"avx2", "fma", "avx"}, "haswell"), ({"sse4_2"}, "nehalem")],
)  # fmt: skip
def test_detect_mcpu_from_flags(flags, mcpu, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert detect_mcpu(flags) == mcpu


def test_detect_mcpu_amd_by_family(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx2", "fma"}
    assert detect_mcpu(avx512, vendor="AuthenticAMD", family=0x1A) == "znver5"
    assert detect_mcpu(avx512, vendor="AuthenticAMD", family=0x19) == "znver4"
    assert detect_mcpu({"avx2", "fma"}, vendor="AuthenticAMD", family=0x19) == "znver3"


@pytest.mark.parametrize("mcpu, lanes", [("cooperlake", 16), ("znver5", 16), ("haswell", 8),
                                         ("x86-64", 4)])  # fmt: skip
def test_vector_lanes_from_llvm_features(mcpu, lanes):
    import tvm

    from graphprune.codegen.cpu_rules import vector_lanes

    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})) == lanes


def test_make_target_names_cpu_and_cores():
    t = make_target("llvm")
    assert str(t.attrs["mcpu"]) not in ("", "native") and int(t.attrs["num-cores"]) >= 1
    assert make_target({"kind": "llvm", "mcpu": "native"}).attrs["mcpu"] != "native"
    with pytest.raises(ConfigError):
        make_target("tpu")
    cuda = make_target("cuda")
    assert str(cuda.attrs["arch"]) == "sm_80" and cuda.host is not None
