"""The ``graphprune`` CLI in a subprocess: run / bench / report / prune / sparsify, exit codes,
bad input and interruption."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from graphprune import models

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def gp(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    r = gp("run", "examples/demo.yaml", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout), r.stderr


def test_demo_recipe(demo):
    out, info, stderr = demo
    assert info["artifact"] == str(out) and info["verify"]["passed"]
    assert Path(info["report_html"]).is_file() and Path(info["report_md"]).is_file()
    assert "compiling for llvm" in stderr and "moving artifact into place" in stderr
    # every step is timed (how long they take is benchmarks' business, not a test's)
    assert {"prune", "compile", "report"} <= info["timings"].keys()
    assert all(t >= 0 for t in info["timings"].values())


def test_replay_in_a_new_process_gives_the_same_hashes(demo, tmp_path):
    out, _, _ = demo
    r = gp("run", out / "recipe.json", "-o", tmp_path / "replay", "--quiet")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    for name in ("model.so", "weights.npz", "recipe.json", "summary.json"):
        if name == "recipe.json":  # differs only in out:
            a, b = (json.loads((d / name).read_text()) for d in (out, tmp_path / "replay"))
            assert {**a, "out": 0} == {**b, "out": 0}
        else:
            assert _sha(out / name) == _sha(tmp_path / "replay" / name), name


def test_bench_then_report(demo):
    out, _, _ = demo
    r = gp("bench", out, "--runs", "3", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [x["name"].split(" ")[0] for x in rows] == ["source", "artifact"]
    assert all(x["median_ms"] > 0 for x in rows)
    r = gp("report", out)
    assert r.returncode == 0, r.stderr
    assert "Latency" in (out / "report.html").read_text()
    assert "latency: artifact" in (out / "report.md").read_text()


def test_existing_out_needs_force(demo):
    out, _, _ = demo
    r = gp("run", "examples/demo.yaml", "-o", out)
    assert r.returncode == 2 and "exists: choose another out or pass --force" in r.stderr


def test_transformers_model_through_the_cli(tmp_path):
    recipe = tmp_path / "bert.yaml"
    recipe.write_text("model: hf_bert_tiny\nprune: {ratio: 0.25, heads: true}\n"
                      "verify: {atol: 1.0e-4}\nout: bert\n")  # fmt: skip
    r = gp("run", recipe, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["artifact"] == str(tmp_path / "bert") and info["verify"]["passed"]
    assert info["totals"]["params_after"] < info["totals"]["params_before"]
    assert len(info["verify"]["vs_compiled_model"]) == 2  # last hidden state and pooled output


@pytest.mark.parametrize("args, message", [
    (["run", "nope.yaml"], "recipe file nope.yaml not found"),
    (["prune", "missing.onnx", "-o", "x.onnx"], "missing.onnx not found"),
    (["prune", "no_such_pkg.models:make", "-o", "x.onnx"], "neither a .onnx file nor importable"),
    (["prune", "README.md", "-o", "x.onnx"], "an existing file that is not .onnx"),
    (["report", "/nonexistent/art"], "not found"),
    (["bench", "/nonexistent/art"], "is not an artifact"),
])  # fmt: skip
def test_user_errors_exit_2(args, message):
    r = gp(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_recipe_typo_exit_2(tmp_path):
    (tmp_path / "r.yaml").write_text("model: resnet_tiny\nsparsify: {patern: '2:4'}\nout: a\n")
    r = gp("run", tmp_path / "r.yaml")
    assert r.returncode == 2
    assert "sparsify.patern: unknown key; did you mean 'pattern'?" in r.stderr
    assert not (tmp_path / "a").exists()


def test_sigterm_midway_leaves_no_artifact(tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "graphprune", "run", "examples/demo.yaml",
                             "-o", str(out)], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until codegen is under way, then stop the run
        if "legalising" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "interrupted" in rest
    assert list(tmp_path.iterdir()) == []  # neither art/ nor a temporary sibling


def test_prune_onnx_in_onnx_out(tmp_path):
    model, x = models.get("resnet_tiny")
    src = tmp_path / "m.onnx"
    torch.onnx.export(model, x, str(src), dynamo=False, input_names=["x"])
    r = gp("prune", src, "-o", tmp_path / "p.onnx", "--ratio", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["form"] == "onnx" and info["params_after"] < info["params_before"]
    r = gp("sparsify", tmp_path / "p.onnx", "-o", tmp_path / "s.onnx", "--pattern", "2:4", "-q")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": x[0].numpy()})[0].shape == (2, 10)
    r = gp("prune", src, "-o", tmp_path / "p.onnx")
    assert r.returncode == 2 and "exists" in r.stderr
    # --ignore keeps a layer's channels; a glob that matches nothing is a user error
    r = gp("prune", src, "-o", tmp_path / "i.onnx", "--ratio", "0.5", "--ignore", "*", "--json")
    assert r.returncode == 2 and "nothing can be pruned" in r.stderr, r.stderr
    r = gp("prune", src, "-o", tmp_path / "i.onnx", "--ignore", "no.such*", "-q")
    assert r.returncode == 2 and "matches no parameter" in r.stderr, r.stderr
    r = gp("prune", src, "-o", tmp_path / "t.onnx", "--target-params", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert 0.4 <= info["params_after"] / info["params_before"] <= 0.5


def test_prune_torch_to_onnx_and_pt2(tmp_path):
    r = gp("prune", "resnet_tiny", "-o", tmp_path / "p.onnx", "-q")
    assert r.returncode == 0, r.stderr
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    _, x = models.get("resnet_tiny")
    feed = {sess.get_inputs()[0].name: x[0].numpy()}
    assert np.isfinite(sess.run(None, feed)[0]).all()
    r = gp("sparsify", "resnet_tiny", "-o", tmp_path / "s.pt2", "--pattern", "2:4", "-q")
    assert r.returncode == 0, r.stderr
    ep = torch.export.load(str(tmp_path / "s.pt2"))
    assert ep.module()(*x).shape == (2, 10)
