"""Artifacts with dynamic shapes, input validation and bounds-checked index inputs.

* a CNN with a dynamic batch and a transformers BERT with dynamic batch and sequence, compiled
  once, match torch at three shapes in a fresh process that has only ``tvm`` and ``numpy``;
* the manifest lists the dynamic dims and their ranges; the loader refuses inputs outside them,
  of the wrong rank or dtype, or disagreeing on a shared dim, naming input, axis and range;
* token ids out of range raise (loader and, without the loader, the check compiled into the
  module), never garbage; id 100000, which crashed the process before, is run in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import ConvBlock, seeded
from graphprune.models.hf import hf_bert_tiny

from graphprune import codegen
from graphprune.ir.errors import ArtifactError, ConfigError

Dim = torch.export.Dim

# Runs an artifact with plain TVM (no graphprune, no torch): argv = artifact dir, then one .npz
# of inputs per call; writes out<i>.npz beside each, or prints the error of a failed call.
PURE_TVM = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "graphprune"):
            raise ImportError(f"{name} must not be needed to run an artifact")
sys.meta_path.insert(0, _Block())
import json, numpy as np, tvm
from tvm import relax
art = sys.argv[1]
man = json.load(open(f"{art}/manifest.json"))
vm = relax.VirtualMachine(tvm.runtime.load_module(f"{art}/{man['library']}"), tvm.cpu())
with np.load(f"{art}/{man['weights']}") as w:
    params = [tvm.runtime.tensor(w[k]) for k in man["weight_names"]]
for path in sys.argv[2:]:
    with np.load(path) as f:
        xs = [f[f"x{i}"] for i in range(len(f.files))]
    try:
        outs = vm[man["entry"]](*[tvm.runtime.tensor(x) for x in xs], *params)
    except Exception as e:
        print("ERROR", type(e).__name__, str(e).strip().splitlines()[-1], flush=True)
        continue
    outs = [outs] if hasattr(outs, "numpy") else list(outs)
    np.savez(path.replace(".npz", ".out.npz"), *[o.numpy() for o in outs])
print("DONE", flush=True)
"""


def run_pure_tvm(art_path, calls, tmp_path, timeout=180):
    """Run ``calls`` (lists of arrays) on the artifact in a fresh ``python -I`` process with
    torch and graphprune blocked; returns (outputs per call or None, completed process)."""
    paths = []
    for i, xs in enumerate(calls):
        p = tmp_path / f"call{i}.npz"
        np.savez(p, **{f"x{j}": np.asarray(x) for j, x in enumerate(xs)})
        paths.append(str(p))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PURE_TVM, str(art_path), *paths],
        check=False, capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    outs = []
    for p in paths:
        out = p.replace(".npz", ".out.npz")
        if os.path.exists(out):
            with np.load(out) as f:
                outs.append(tuple(f[f"arr_{k}"] for k in range(len(f.files))))
        else:
            outs.append(None)
    return outs, proc


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    model = seeded(ConvBlock)
    batch = Dim("batch", min=1, max=16)
    art = codegen.compile(
        model, (torch.randn(2, 3, 16, 16),), out_dir=tmp_path_factory.mktemp("cnn") / "art",
        dynamic_shapes=({0: batch},),
    )  # fmt: skip
    return model, art


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    model, inputs = hf_bert_tiny()  # vocab 128, max positions 64
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=2, max=64)
    art = codegen.compile(
        model, inputs, out_dir=tmp_path_factory.mktemp("bert") / "art",
        dynamic_shapes={"inputs": ({0: batch, 1: seq}, {0: batch, 1: seq})},
    )  # fmt: skip
    return model, art


def _tokens(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[0, s // 2 :] = 0  # padding in the first sequence
    return ids, mask


def test_cnn_dynamic_batch_matches_torch_at_three_shapes_with_only_tvm(cnn, tmp_path):
    model, art = cnn
    assert art.manifest["dynamic_dims"] == {"batch": [1, 16]}
    assert art.manifest["inputs"] == [
        {"name": "x", "shape": ["batch", 3, 16, 16], "dtype": "float32"}
    ]
    assert art.manifest["outputs"][0]["shape"] == ["batch", 10]
    calls = [(torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(b)),)
             for b in (1, 5, 16)]  # fmt: skip
    outs, proc = run_pure_tvm(art.path, calls, tmp_path)
    assert "DONE" in proc.stdout, proc.stderr[-2000:]
    for xs, out in zip(calls, outs):
        assert_matches(out, torch_outputs(model, xs))
        assert_matches(art(*xs), torch_outputs(model, xs))  # and through the loader


def test_bert_dynamic_batch_and_sequence_matches_torch_at_three_shapes(bert, tmp_path):
    model, art = bert
    man = art.manifest
    assert man["dynamic_dims"] == {"batch": [1, 8], "seq": [2, 64]}
    assert [i["shape"] for i in man["inputs"]] == [["batch", "seq"], ["batch", "seq"]]
    calls = [_tokens(b, s, seed=b * s) for b, s in ((1, 5), (3, 17), (8, 64))]
    outs, proc = run_pure_tvm(art.path, calls, tmp_path)
    assert "DONE" in proc.stdout, proc.stderr[-2000:]
    for xs, out in zip(calls, outs):
        assert out[0].shape == (xs[0].shape[0], xs[0].shape[1], 64)
        assert_matches(out, torch_outputs(model, xs))
    # Without a mask row of zeros too (every position attended), through the loader.
    ids, _ = _tokens(2, 9)
    mask = torch.ones_like(ids)
    assert_matches(art(ids, mask), torch_outputs(model, (ids, mask)))


def test_loader_names_input_axis_and_range(cnn, bert):
    _, art = cnn
    with pytest.raises(ArtifactError, match=r"input 'x', axis 0 \(dynamic dim 'batch'\): 17 is "
                                            r"outside the compiled range \[1, 16\]"):  # fmt: skip
        art(np.zeros((17, 3, 16, 16), np.float32))
    with pytest.raises(ArtifactError, match=r"input 'x', axis 2: expected 16, got 8"):
        art(np.zeros((2, 3, 8, 16), np.float32))
    with pytest.raises(ArtifactError, match=r"input 'x': expected rank 4 .*got shape \(3, 16, 16\)"):
        art(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ArtifactError, match=r"input 'x': expected dtype float32, got dtype int64"):
        art(np.zeros((2, 3, 16, 16), np.int64))
    _, art = bert
    ids, mask = _tokens(2, 8)
    with pytest.raises(ArtifactError, match=r"input 'inputs_1', axis 1 \(dynamic dim 'seq'\) is "
                                            r"7, but input 'inputs_0' axis 1 gave 'seq' = 8"):  # fmt: skip
        art(ids, mask[:, :7])
    with pytest.raises(ArtifactError, match=r"'seq'\): 65 is outside the compiled range \[2, 64\]"):
        art(*_tokens(1, 65))


@pytest.mark.parametrize("bad", [-1, 128, 129])
def test_out_of_range_token_ids_raise_naming_the_input(bert, bad):
    model, art = bert
    ids, mask = _tokens(2, 8)
    ids[1, 3] = bad
    with pytest.raises(ArtifactError, match=rf"input 'inputs_0': index {bad} at position \(1, 3\) "
                                            r"is outside \[0, 128\)"):  # fmt: skip
        art(ids, mask)
    with pytest.raises(IndexError):  # what PyTorch does
        torch_outputs(model, (ids, mask))


def test_bounds_check_is_compiled_into_the_module(bert, tmp_path):
    """Without graphprune's loader (plain TVM, fresh process): ids -1, 128, 129 and 100000 (a
    segfault before) raise an error naming the input; the process survives and a good call
    after them still computes."""
    model, art = bert
    rec = art.manifest["index_inputs"]
    assert rec == [{"input": "inputs_0", "range": [0, 128], "axis": 0, "direct": True,
                    "indexes": "model.embeddings.word_embeddings.weight"}]  # fmt: skip
    calls = []
    for bad in (-1, 128, 129, 100000, 2**32 + 5):  # 2**32 + 5 would wrap to 5 in int32
        ids, mask = _tokens(2, 8)
        ids[1, 3] = bad
        calls.append((ids, mask))
    good = _tokens(2, 8)
    outs, proc = run_pure_tvm(art.path, [*calls, good], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == len(calls), proc.stdout
    for line in errors:
        assert "graphprune index check: input 'inputs_0' has an index outside [0, 128)" in line
    assert outs[: len(calls)] == [None] * len(calls)
    assert_matches(outs[-1], torch_outputs(model, good))


def test_static_artifact_checks_token_ids_too(tmp_path):
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4)).eval()
    ids = torch.tensor([[1, 2, 3]])
    art = codegen.compile(emb, (ids,), out_dir=tmp_path / "art")
    assert "dynamic_dims" not in art.manifest
    assert art.manifest["index_inputs"][0]["range"] == [0, 10]
    assert_matches(art(ids), torch_outputs(emb, (ids,)))
    with pytest.raises(ArtifactError, match=r"input 'input': index 10 at position \(0, 1\)"):
        art(torch.tensor([[1, 10, 3]]))


def test_onnx_dim_params_become_dynamic(tmp_path):
    model = seeded(ConvBlock)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"dynamic_shapes names \['batch'\].*dim_params: \['n'\]"):
        codegen.compile(path, out_dir=tmp_path / "bad", dynamic_shapes={"batch": (1, 8)})
    with pytest.raises(ConfigError, match=r"dynamic_shapes\['n'\] = \(4, 2\)"):
        codegen.compile(path, out_dir=tmp_path / "bad", dynamic_shapes={"n": (4, 2)})
    art = codegen.compile(path, out_dir=tmp_path / "art", dynamic_shapes={"n": (1, 8)})
    assert art.manifest["dynamic_dims"] == {"n": [1, 8]}
    assert art.manifest["inputs"][0]["shape"] == ["n", 3, 16, 16]
    for b in (1, 3, 8):
        x = torch.randn(b, 3, 16, 16)
        assert_matches(art(x), torch_outputs(model, (x,)))
    with pytest.raises(ArtifactError, match=r"'n'\): 9 is outside the compiled range \[1, 8\]"):
        art(np.zeros((9, 3, 16, 16), np.float32))


def test_dynamic_shapes_refuses_what_specialises_on_the_batch(tmp_path):
    model = torch.nn.Linear(8, 4).eval()
    dyn = ({0: Dim("batch", min=1, max=8)},)
    # sparse kernels take a symbolic batch (tests/codegen/test_sparse_dynamic.py); tuning not
    with pytest.raises(ConfigError, match="tuning specialises on one batch size"):
        codegen.compile(model, (torch.randn(2, 8),), out_dir=tmp_path / "a", tune=True,
                        trials=1, dynamic_shapes=dyn)  # fmt: skip
    with pytest.raises(ConfigError, match="dynamic_shapes for a torch model"):
        codegen.compile(model, (torch.randn(2, 8),), out_dir=tmp_path / "a", dynamic_shapes=3)
    assert not (tmp_path / "a").exists()
    # The manifest of a dynamic artifact round-trips through json with its ranges.
    art = codegen.compile(model, (torch.randn(2, 8),), out_dir=tmp_path / "b", dynamic_shapes=dyn)
    assert json.loads((art.path / "manifest.json").read_text())["dynamic_dims"] == {
        "batch": [1, 8]
    }


def test_dim_bounds_become_tir_var_bounds_on_main(tmp_path):
    from graphprune.codegen.lower import lower_onnx, lower_torch

    lin = torch.nn.Linear(4, 2).eval()
    lowered = lower_torch(lin, (torch.randn(2, 4),), ({0: Dim("batch", min=1, max=32)},))
    main = lowered.mod["main"]
    sym = main.params[0].ty.shape.values[0].name  # torch's name for it, e.g. s77
    assert int(main.attrs["tir_var_lower_bound"][sym]) == 1
    assert int(main.attrs["tir_var_upper_bound"][sym]) == 32
    assert lowered.dims == {"batch": (1, 32)} and lowered.inputs[0].shape == ("batch", 4)
    path = tmp_path / "lin.onnx"
    torch.onnx.export(lin, (torch.randn(2, 4),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)  # fmt: skip
    main = lower_onnx(path, dynamic_shapes={"n": (2, 64)}).mod["main"]
    assert int(main.attrs["tir_var_lower_bound"]["n"]) == 2
    assert int(main.attrs["tir_var_upper_bound"]["n"]) == 64
