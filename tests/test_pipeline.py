"""``gp.run``: the whole pipeline on the default model and on ONNX, atomic artifacts, replay
determinism, verification, the fine-tune callback, and the export integrations."""

import doctest
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
import graphprune.api.integration as integration_mod
from graphprune import models
from graphprune.app import pipeline
from graphprune.app import verify as verify_mod
from graphprune.ir.errors import ConfigError, VerificationError

RECIPE = {
    "model": "resnet_tiny",
    "prune": {"ratio": 0.3, "scope": "global", "round_to": 4},
    "sparsify": {"pattern": "2:4"},
    "verify": {"atol": 1e-4},
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "demo"
    return gp.run({**RECIPE, "out": str(out)})


def test_end_to_end_default_model(demo):
    art = demo.out_dir
    names = {p.name for p in art.iterdir()}
    assert {"model.so", "weights.npz", "manifest.json", "recipe.json", "summary.json",
            "run.json", "report.html", "report.md"} <= names  # fmt: skip
    assert demo.summary["verify"]["passed"]
    assert demo.summary["verify"]["vs_compiled_model"][0]["max_abs_diff"] < 1e-4
    t = demo.summary["totals"]
    assert t["params_after"] < t["params_before"] and t["macs_after"] < t["macs_before"]
    assert t["sparsified_fraction"] == pytest.approx(0.5)
    # the artifact reproduces the pruned model on the recipe's example inputs
    _, x = models.get("resnet_tiny")
    ref = demo.model(*x).detach().numpy()
    np.testing.assert_allclose(gp.load(art)(*x), ref, atol=1e-4, rtol=1e-4)
    rows = {r["param"]: r for r in demo.summary["layers"]}
    assert any(r["channels_after"] < r["channels_before"] for r in rows.values())
    assert any(r.get("pattern") == "2:4" for r in rows.values())
    assert demo.artifact.manifest["masks"] == "graph"  # sparsify's masks, not zeros re-detected
    assert _leftovers(art.parent) == []


def test_replay_gives_the_same_artifact_hashes(demo, tmp_path):
    """The resolved recipe in the artifact replays to byte-identical files (manifest.json only
    differs in its `created` timestamp and the digest over it)."""
    again = gp.run(demo.out_dir / "recipe.json", out=tmp_path / "again")
    for name in ("model.so", "weights.npz", "summary.json"):
        assert _sha(demo.out_dir / name) == _sha(again.out_dir / name), name
    r1 = json.loads((demo.out_dir / "recipe.json").read_text())
    r2 = json.loads((again.out_dir / "recipe.json").read_text())
    assert {**r1, "out": None} == {**r2, "out": None}
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (demo.out_dir, again.out_dir))
    for m in (m1, m2):
        m.pop("created"), m.pop("self_sha256")
    assert m1 == m2


def test_existing_out_is_refused_without_force(demo, tmp_path):
    before = {p.name: _sha(p) for p in demo.out_dir.iterdir()}
    with pytest.raises(ConfigError, match="exists: choose another out or pass --force"):
        gp.run({**RECIPE, "out": str(demo.out_dir)})
    assert {p.name: _sha(p) for p in demo.out_dir.iterdir()} == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a graphprune artifact; refusing"):
        gp.run({**RECIPE, "out": str(other)}, force=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leaves_nothing(tmp_path):
    def interrupt(model, inputs, calib):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gp.run({**RECIPE, "prune": None, "out": str(tmp_path / "a")}, fine_tune=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_writes_no_artifact(tmp_path, monkeypatch):
    real = verify_mod.run_source
    calls = []

    def off_by_one(model, inputs):  # the first call is the compiled model's reference
        calls.append(1)
        outs = real(model, inputs)
        return [o + 1.0 for o in outs] if len(calls) == 1 else outs

    monkeypatch.setattr(verify_mod, "run_source", off_by_one)
    with pytest.raises(VerificationError, match="no artifact was written"):
        gp.run({**RECIPE, "prune": None, "sparsify": None, "out": str(tmp_path / "a")})
    assert list(tmp_path.iterdir()) == []


def test_fine_tune_callback_keeps_the_masks(tmp_path):
    seen = {}

    def fine_tune(model, inputs, calib):
        seen["calib"] = calib
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)  # would revive every pruned weight
        return model

    res = gp.run({"model": "resnet_tiny", "sparsify": {"pattern": "2:4"},
                  "calib": {"batches": 2}, "out": str(tmp_path / "ft"), "report": False},
                 fine_tune=fine_tune)  # fmt: skip
    assert len(seen["calib"]) == 2
    w = dict(res.model.named_parameters())
    assert (w["stages.0.0.body.0.weight"] == 0).float().mean().item() == pytest.approx(0.5)
    assert not (tmp_path / "ft" / "report.html").exists()


def test_onnx_in_onnx_out(tmp_path):
    model, x = models.get("resnet_tiny")
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, x, str(path), dynamo=False, input_names=["x"])
    res = gp.run({"model": str(path), "prune": {"ratio": 0.3}, "sparsify": {"pattern": "2:4"},
                  "out": str(tmp_path / "art")})  # fmt: skip
    assert res.summary["frontend"] == "onnx" and res.summary["verify"]["passed"]
    assert res.artifact.manifest["masks"] == "graph"
    pruned = tmp_path / "art" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(pruned)))
    sess = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x[0].numpy()})[0]
    np.testing.assert_allclose(res.artifact(x[0].numpy()), y, atol=1e-4, rtol=1e-4)


def test_model_specs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        pipeline.load_model(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ConfigError, match="not a readable ONNX file"):
        pipeline.load_model(str(tmp_path / "junk.onnx"))
    with pytest.raises(ConfigError, match="neither a .onnx file nor importable"):
        pipeline.load_model("no_such_pkg.mod:make")
    with pytest.raises(ConfigError, match="not a zoo name"):
        pipeline.load_model("resnet_tinny")
    (tmp_path / "factory.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 8)), (torch.randn(2, 8),)\n"
        "def broken():\n"
        "    raise RuntimeError('boom')\n")  # fmt: skip
    _, inputs = pipeline.load_model(f"{tmp_path / 'factory.py'}:make")
    assert inputs[0].shape == (2, 8)
    with pytest.raises(ConfigError, match="raised RuntimeError: boom"):
        pipeline.load_model(f"{tmp_path / 'factory.py'}:broken")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        pipeline.load_model(f"{tmp_path / 'factory.py'}:nope")


def test_prune_exported_doctest_and_zoo():
    result = doctest.testmod(integration_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
    model, x = models.get("resnet_tiny")
    ep = gp.prune_exported(torch.export.export(model, x), ratio=0.3)
    assert isinstance(ep, torch.export.ExportedProgram)
    n0 = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in ep.parameters()) < n0
    assert ep.module()(*x).shape == model(*x).shape
    with pytest.raises(ConfigError, match="ExportedProgram"):
        gp.prune_exported(model)


def test_onnx_export_of_a_pruned_model_runs_in_onnxruntime(tmp_path):
    for name in ("resnet_tiny", "vit_tiny"):
        model, x = models.get(name)
        small = gp.prune(model, x, ratio=0.3).model
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(small, x, str(path), dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)}
        with torch.no_grad():
            ref = small(*x)
        np.testing.assert_allclose(sess.run(None, feed)[0], ref.numpy(), atol=1e-4, rtol=1e-4)
