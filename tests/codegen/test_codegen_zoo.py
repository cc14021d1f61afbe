"""Every model of ``graphprune.models.ZOO`` compiled and compared with PyTorch (atol=rtol=1e-4).

Torch frontend for all models; ONNX frontend for a CNN and a transformer. Models TVM 0.27's
importers or LLVM codegen cannot handle yet are ``xfail(strict=True)`` with the reason, so a
TVM upgrade that fixes them shows up as an XPASS.
"""

from __future__ import annotations

import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs

from graphprune import codegen

models = pytest.importorskip("graphprune.models")

# Models TVM 0.27 cannot compile, with the reason (none at present). Two that were here are
# worked around in codegen/frontend.py: hf_llama_tiny (the importer typed cumsum of a bool mask
# as bool; LLVM then aborted on an i1 add) and hf_gpt2_tiny (torch's sdpa decomposition broke a
# later .view(); the importer takes sdpa itself but only with a float mask).
KNOWN_TVM_FAILURES: dict[str, str] = {}


def _params():
    for name in sorted(models.ZOO):
        marks = []
        if name in KNOWN_TVM_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_TVM_FAILURES[name], strict=True))
        yield pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", list(_params()))
def test_zoo_torch_frontend(name, tmp_path):
    model, inputs = models.get(name)
    art = codegen.compile(model, inputs, out_dir=tmp_path / name)
    assert_matches(art(*inputs), torch_outputs(model, inputs))


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenetv2_tiny", "vit_tiny"])
def test_zoo_onnx_frontend(name, tmp_path):
    model, inputs = models.get(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, tuple(inputs), str(path), dynamo=False)
    art = codegen.compile(str(path), out_dir=tmp_path / "art")
    assert_matches(art(*[x.numpy() for x in inputs]), torch_outputs(model, inputs))
