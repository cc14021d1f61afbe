"""Every zoo model × three ONNX export forms (heavy; ``pytest -m heavy tests/frontends``).

Each export is captured, has at least the torch capture's groups (compared by the parameter
shapes each touches: :func:`frontends.onnx_forms.signatures`), prunes (``gp.prune`` runs the
written model in onnxruntime), passes ``onnx.checker``, and passes the dead-channel oracle in
onnxruntime on every prunable group (at batch 2 and 1 for the dynamic-batch export).
"""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from frontends.onnx_forms import FORMS, export, signatures

import graphprune as gp
from graphprune import models
from graphprune.testing.oracle import run_oracle

# Exports that cannot be made: the legacy exporter has no aten::diff (transformers' Llama
# mask code) at opset 17.
NO_LEGACY = {"hf_llama_tiny"}

# ONNX finds *more* groups than torch where the torch capture freezes through an op it has no
# rule for and the exporter decomposes it: roll (Swin's shifted windows: Slice + Concat) and
# the relative-position gather (folded into a constant bias). Missing torch groups fail.
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def torch_signatures():
    cache: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in cache:
            model, inputs = models.get(name)
            cache[name] = signatures(gp.capture(model, inputs))
        return cache[name]

    return get


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_onnx_form(name, form, tmp_path, torch_signatures):
    if name in NO_LEGACY and form != "dynamo":
        pytest.skip("the legacy exporter cannot export this model")
    model, inputs = models.get(name)
    path = export(model, inputs, tmp_path / "m.onnx", form)
    pg = gp.capture(path)
    missing = Counter(torch_signatures(name)) - Counter(signatures(pg))
    assert not missing, f"torch groups not found in the {form} export: {missing}\n{gp.explain(pg)}"
    res = gp.prune(path, ratio=0.3)
    onnx.checker.check_model(res.model)
    if form == "legacy_dyn":
        assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for g in [g for g in gp.groups(pg) if g.prunable]:
        run_oracle(pg, g.id).assert_close(atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["Swin", "Swinv2"])
def test_transformers_swin(family, form, tmp_path):
    # Window attention with a relative-position bias (v2: a continuous-position MLP and cosine
    # attention), shifted-window masks over batch × windows: the pattern issue 15 reported.
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, f"{family}Config")(image_size=112, embed_dim=24, depths=[2, 2],
                                                   num_heads=[3, 6], window_size=7)  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}Model")(cfg).eval()
    path = export(model, (torch.randn(2, 3, 112, 112),), tmp_path / "m.onnx", form)
    pg = gp.capture(path)
    groups = [g for g in gp.groups(pg) if g.prunable]
    assert not {g.size for g in groups} & {7, 49}  # window geometry is never a group
    gp.prune(path, ratio=0.3)
    for g in groups:
        run_oracle(pg, g.id).assert_close(atol=5e-5, rtol=1e-4)
