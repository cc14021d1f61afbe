"""Pruned ``transformers`` models reload in a fresh process: the default result with plain
``transformers`` (no graphprune imported), per-layer widths through ``graphprune.from_pretrained``.
Inputs and outputs cross the process boundary as safetensors files (no pickle)."""

from __future__ import annotations

import os

import pytest
import torch
from hf_helpers import GRAPHPRUNE, PLAIN, main_output, pruned, run_script, token_batch

import graphprune as gp
from graphprune.ir.errors import ConfigError

safetensors = pytest.importorskip("safetensors.torch")
pytest.importorskip("transformers")

def _inputs(family: str) -> dict:
    if family == "vit":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    return token_batch(3, 11, masked=True)


def test_default_result_reloads_with_plain_transformers(tmp_path):
    families = ["llama", "qwen2", "gpt2", "bert", "vit"]
    dirs, want = [], []
    for fam in families:
        _, _, res = pruned(fam)
        d = str(tmp_path / fam)
        res.model.save_pretrained(d)
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(d))
        x = _inputs(fam)
        safetensors.save_file(x, os.path.join(d, "inputs.safetensors"))
        with torch.no_grad():
            want.append(main_output(res.model(**x)))
        dirs.append(d)
    got = run_script(PLAIN, *dirs)
    for i, fam in enumerate(families):
        assert got[str(i)].shape == want[i].shape, fam
        torch.testing.assert_close(got[str(i)], want[i], atol=1e-6, rtol=1e-5, msg=fam)


def test_per_layer_widths_round_trip_through_graphprune(tmp_path):
    model, _, res = pruned("llama", ratio=0.0, uniform=False,
                           ratios={"model.layers.0.mlp.*": 0.5, "model.layers.1.mlp.*": 0.25})  # fmt: skip
    assert res.report.form == "module"
    widths = [layer.mlp.intermediate_size for layer in res.model.model.layers]
    assert widths == [64, 96]
    assert any("graphprune.from_pretrained" in n for n in res.report.notes)
    d = str(tmp_path / "llama")
    res.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json", "graphprune_plan.json", "model.safetensors"]
    x = token_batch(2, 9, masked=True)
    safetensors.save_file(x, os.path.join(d, "inputs.safetensors"))
    got = run_script(GRAPHPRUNE, d)["0"]
    with torch.no_grad():
        want = res.model(**x).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    again = gp.from_pretrained(d)  # in process too: same class, same per-layer widths
    assert type(again) is type(model)
    assert [layer.mlp.intermediate_size for layer in again.model.layers] == widths


def test_graph_module_result_says_how_to_save(tmp_path):
    _, _, res = pruned("llama", uniform=False)  # head_dim cut: the forward cannot follow
    assert res.report.form == "graph_module"
    with pytest.raises(ConfigError, match="torch.export"):
        res.save_pretrained(str(tmp_path / "x"))


def test_from_pretrained_without_plan_names_the_fix(tmp_path):
    _, _, res = pruned("bert")
    res.model.save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="from_pretrained"):
        gp.from_pretrained(str(tmp_path))


def test_from_pretrained_refuses_a_class_outside_transformers(tmp_path):
    import json

    _, _, res = pruned("llama", ratio=0.0, uniform=False, ratios={"model.layers.0.mlp.*": 0.5})
    res.save_pretrained(str(tmp_path))
    plan_file = tmp_path / "graphprune_plan.json"
    plan = json.loads(plan_file.read_text())
    plan["module"], plan["class"] = "os", "system"
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match="not a transformers model class"):
        gp.from_pretrained(str(tmp_path))
