"""``graphprune compile`` (codegen.cli.compile_main) and target detection."""

from __future__ import annotations

import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import ConvBlock, seeded

from graphprune.app.cli_compile import compile_main
from graphprune.codegen.target import detect_mcpu, make_target
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


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert compile_main([str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


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
