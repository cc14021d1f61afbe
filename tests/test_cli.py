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


# --- user errors: exit 2 and one line on stderr, checked before any work -------------------------


def cli(*argv, capsys):
    """``graphprune ARGV`` in this process: (exit code, stdout, stderr)."""
    from graphprune.app.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """resnet_tiny as a static ONNX and with a dynamic batch axis (``dynamic_axes``)."""
    d = tmp_path_factory.mktemp("onnx")
    model, x = models.get("resnet_tiny")
    torch.onnx.export(model, x, str(d / "s.onnx"), dynamo=False, input_names=["x"])
    torch.onnx.export(model, x, str(d / "d.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})  # fmt: skip
    return d


def test_compile_onto_a_file_or_foreign_folder_is_refused_before_building(tmp_path, onnx_files,
                                                                          capsys):  # fmt: skip
    (tmp_path / "afile").write_text("mine")
    rc, _, err = cli("compile", onnx_files / "s.onnx", "-o", tmp_path / "afile", capsys=capsys)
    assert rc == 2
    assert "afile is an existing file, and an artifact is a directory" in one_line(err)
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "art").mkdir()  # an earlier artifact: replaced only with --force
    (tmp_path / "art" / "manifest.json").write_text("{}")
    rc, _, err = cli("compile", onnx_files / "s.onnx", "-o", tmp_path / "art", capsys=capsys)
    assert rc == 2 and "exists: choose another out or pass --force" in one_line(err)
    (tmp_path / "notes").mkdir()  # someone's folder: never replaced, even with --force
    (tmp_path / "notes" / "todo.txt").write_text("x")
    rc, _, err = cli("compile", onnx_files / "s.onnx", "-o", tmp_path / "notes", "--force",
                     capsys=capsys)  # fmt: skip
    assert rc == 2 and "is not a graphprune artifact" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "art", "notes"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="uses /proc, which takes no files")
@pytest.mark.parametrize("cmd", [["prune", "S", "-o", "/proc/gp/x.onnx"],
                                 ["sparsify", "S", "-o", "/proc/x.onnx"],
                                 ["inspect", "S", "--json", "/proc/g.json"],
                                 ["compile", "S", "-o", "/proc/gp/art"],
                                 ["run", "examples/demo.yaml", "-o", "/proc/art"]])  # fmt: skip
def test_an_unwritable_output_is_refused_before_any_work(cmd, onnx_files, capsys):
    # /proc refuses new files even to root (for whom permission bits do not apply)
    argv = [onnx_files / "s.onnx" if a == "S" else a for a in cmd]
    rc, _, err = cli(*argv, capsys=capsys)
    assert rc == 2 and "/proc does not take new files" in one_line(err), err


def test_prune_output_errors_and_created_parents(tmp_path, onnx_files, capsys):
    src = onnx_files / "s.onnx"
    rc, _, err = cli("prune", src, "-o", tmp_path, capsys=capsys)  # a folder
    assert rc == 2 and "-o" in one_line(err) and "use .onnx, .pt2" in err
    (tmp_path / "d.onnx").mkdir()
    rc, _, err = cli("prune", src, "-o", tmp_path / "d.onnx", "--force", capsys=capsys)
    assert rc == 2 and "is a directory: give a file path" in one_line(err)
    (tmp_path / "f").write_text("")
    rc, _, err = cli("prune", src, "-o", tmp_path / "f" / "p.onnx", capsys=capsys)
    assert rc == 2 and "is a file, not a directory" in one_line(err)
    rc, _, err = cli("prune", src, "-o", tmp_path / "p.onnx", "--ratio", "abc", capsys=capsys)
    assert rc == 2 and "argument --ratio: invalid float value: 'abc'" in one_line(err)
    rc, _, err = cli("prune", src, "-o", tmp_path / "p.onnx", "--ratio", "1.5", capsys=capsys)
    assert rc == 2 and "ratio=1.5 is outside [0, 1)" in one_line(err)
    rc, _, err = cli("prune", src, "-o", tmp_path / "p.onnx", "--criterion", "taylor",
                     capsys=capsys)  # fmt: skip
    assert rc == 2 and "needs calibration data" in one_line(err)
    rc, _, err = cli("prune", src, capsys=capsys)
    assert rc == 2 and "required: -o/--out" in one_line(err)
    # a missing parent is created, and said so
    out = tmp_path / "new" / "deeper" / "p.onnx"
    rc, _, err = cli("prune", src, "-o", out, "--ratio", "0.25", capsys=capsys)
    assert rc == 0 and out.is_file(), err
    assert f"created directory {tmp_path / 'new'}" in err
    rc, _, err = cli("prune", src, "-o", out, capsys=capsys)  # exists: needs --force
    assert rc == 2 and "exists: choose another output or pass --force" in one_line(err)
    rc, _, err = cli("prune", src, "-o", out, "--force", "-q", capsys=capsys)
    assert rc == 0 and err == ""
    assert [p.name for p in out.parent.iterdir()] == ["p.onnx"]  # no staging file left


def test_help_states_the_output_rules(capsys):
    for cmd in ("prune", "compile", "run", "sparsify", "inspect"):
        rc, out, _ = cli(cmd, "-h", capsys=capsys)
        text = " ".join(out.split())
        assert rc == 0 and "replaced only with --force; missing parent directories are created" in text, cmd


# --- ONNX with dynamic axes: --shape / --dynamic ------------------------------------------------


def _batch_dims(path: Path) -> list:
    import onnx

    m = onnx.load(str(path))
    return [next(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in (*m.graph.input, *m.graph.output)]  # fmt: skip


def test_prune_inspect_sparsify_take_shape_of_a_dynamic_onnx(tmp_path, onnx_files, capsys):
    src = onnx_files / "d.onnx"
    out = tmp_path / "p.onnx"
    rc, stdout, err = cli("prune", src, "-o", out, "--shape", "x=4,3,32,32", "--dynamic",
                          "batch=1,8", "--json", capsys=capsys)  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["params_after"] < json.loads(stdout)["params_before"]
    assert _batch_dims(out) == ["batch", "batch"]  # the batch stays symbolic
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 8):
        x = np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype("float32")
        assert sess.run(None, {"x": x})[0].shape == (n, 10)
    rc, stdout, err = cli("inspect", src, "--shape", "x=3,3,32,32", "--json", tmp_path / "g.json",
                          capsys=capsys)  # fmt: skip
    assert rc == 0 and "prunable" in stdout, err
    graph = json.loads((tmp_path / "g.json").read_text())
    x = next(n for n in graph["nodes"] if n["id"] == "x")
    assert x["shape"] == [3, 3, 32, 32]  # analysed at the --shape batch
    rc, _, err = cli("sparsify", src, "-o", tmp_path / "s.onnx", "--shape", "x=2,3,32,32",
                     "--dynamic", "batch=1,4", "--pattern", "2:4", "-q", capsys=capsys)  # fmt: skip
    assert rc == 0 and _batch_dims(tmp_path / "s.onnx") == ["batch", "batch"], err


@pytest.mark.parametrize("args, message", [
    (["--shape", "y=1,3,32,32"], ("--shape names ['y'], which are not inputs of the model; "
                                  "its inputs are ['x']")),
    (["--shape", "x=4,3,32"], "--shape x=4,3,32: the input has rank 4"),
    (["--shape", "x=4,3,16,16"], "--shape x: axis 2 is fixed at 32 in the model, got 16"),
    (["--shape", "x=16,3,32,32", "--dynamic", "batch=1,8"],
     "dim 'batch' = 16 is outside its --dynamic range 1,8"),
    (["--dynamic", "batch=8,1"], "--dynamic 'batch=8,1': need 1 <= MIN <= MAX"),
    (["--shape", "x=a,b"], "--shape 'x=a,b': dims must be integers"),
])  # fmt: skip
def test_bad_shape_options_are_one_line_errors(args, message, tmp_path, onnx_files, capsys):
    rc, _, err = cli("prune", onnx_files / "d.onnx", "-o", tmp_path / "p.onnx", *args,
                     capsys=capsys)  # fmt: skip
    assert rc == 2 and message in one_line(err)
    assert not (tmp_path / "p.onnx").exists()


def test_shape_is_refused_for_a_torch_model(tmp_path, capsys):
    rc, _, err = cli("prune", "resnet_tiny", "-o", tmp_path / "p.onnx", "--shape", "x=1,3,32,32",
                     capsys=capsys)  # fmt: skip
    assert rc == 2 and "--shape and --dynamic are for ONNX models" in one_line(err)
