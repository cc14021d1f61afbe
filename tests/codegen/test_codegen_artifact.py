"""Artifact round trip and refusal of tampered, truncated or misused artifacts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from codegen_models import ConvBlock, seeded

from graphprune import codegen
from graphprune.ir.errors import ArtifactError
from graphprune.runtime import load

SNIPPET = Path(__file__).parents[2] / "codegen" / "README_SNIPPET.md"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    model, inputs = seeded(ConvBlock), (torch.randn(2, 3, 16, 16),)
    art = codegen.compile(model, inputs, out_dir=tmp_path_factory.mktemp("a") / "art")
    return model, inputs, art


@pytest.fixture
def copy_of(compiled, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(compiled[2].path, dst)
    return dst


def test_calls_reuse_input_buffers_without_mixing_inputs(compiled):
    # Inputs are copied into buffers kept per thread: each call must see its own input,
    # in sequence and from concurrent threads.
    from concurrent.futures import ThreadPoolExecutor

    model, inputs, art = compiled
    xs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        refs = [model(x).numpy() for x in xs]
    for x, ref in zip(xs + xs[::-1], refs + refs[::-1]):
        np.testing.assert_allclose(art(x), ref, rtol=1e-4, atol=1e-4)  # aligned: no copy
        odd = np.empty(x.numel() + 1, np.float32)[1:].reshape(x.shape)  # misaligned: copied
        odd[...] = x.numpy()
        np.testing.assert_allclose(art(odd), ref, rtol=1e-4, atol=1e-4)
        frozen = x.numpy().copy()
        frozen.flags.writeable = False  # DLPack cannot export it: copied
        np.testing.assert_allclose(art(frozen), ref, rtol=1e-4, atol=1e-4)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: art(xs[i % 4]), range(32)))
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, refs[i % 4], rtol=1e-4, atol=1e-4)


def test_manifest_describes_the_artifact(compiled):
    _, inputs, art = compiled
    man = art.manifest
    assert man["inputs"] == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert man["outputs"][0]["shape"] == [2, 10]
    assert man["target"]["kind"] == "llvm" and man["target"]["mcpu"] not in ("", "native")
    assert set(man["files"]) == {"model.so", "weights.npz"}
    assert {"graphprune", "tvm", "numpy"} <= set(man["versions"])
    assert sorted(p.name for p in art.path.iterdir()) == ["manifest.json", "model.so", "weights.npz"]


def test_round_trip_in_a_fresh_process(compiled, tmp_path):
    model, inputs, art = compiled
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    code = (
        "import sys, numpy as np; from graphprune.runtime import load; "
        "art = load(sys.argv[1]); np.save(sys.argv[3], art(np.load(sys.argv[2])))"
    )
    out = tmp_path / "y.npy"
    subprocess.run([sys.executable, "-c", code, str(art.path), str(tmp_path / "x.npy"), str(out)],
                   check=True, timeout=120)  # fmt: skip
    assert_matches(np.load(out), torch_outputs(model, inputs))


_BLOCK_IMPORTS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "graphprune"):
            raise ImportError(f"{name} must not be needed by the pure-TVM loader")
sys.meta_path.insert(0, _Block())
"""


def test_readme_snippet_runs_with_only_tvm_and_numpy(compiled, tmp_path):
    model, inputs, art = compiled
    text = SNIPPET.read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "run_artifact.py").write_text(snippet)
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    check = (
        _BLOCK_IMPORTS
        + "import runpy\nsys.argv = ['run_artifact.py', sys.argv[1], 'x.npy']\n"
        + "runpy.run_path('run_artifact.py', run_name='__main__')\n"
        + "assert not {'torch', 'graphprune'} & set(sys.modules), sorted(sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    subprocess.run([sys.executable, "-I", "-c", check, str(art.path)], cwd=tmp_path, env=env,
                   check=True, timeout=120)  # fmt: skip
    with np.load(tmp_path / "outputs.npz") as out:
        assert_matches(tuple(out[k] for k in sorted(out.files)), torch_outputs(model, inputs))


def test_edited_manifest_is_refused(copy_of):
    man = json.loads((copy_of / "manifest.json").read_text())
    man["inputs"][0]["shape"] = [1, 3, 16, 16]
    (copy_of / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="modified"):
        load(copy_of)


def test_truncated_library_is_refused(copy_of):
    lib = copy_of / "model.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="model.so is corrupt, truncated or tampered"):
        load(copy_of)


def test_tampered_weights_are_refused(copy_of):
    w = dict(np.load(copy_of / "weights.npz"))
    w["w0000"] = w["w0000"] + 1
    np.savez(copy_of / "weights.npz", **w)
    with pytest.raises(ArtifactError, match="weights.npz"):
        load(copy_of)


@pytest.mark.parametrize("name", ["weights.npz", "model.so", "manifest.json"])
def test_missing_file_is_refused(copy_of, name):
    (copy_of / name).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load(copy_of)


def test_wrong_input_shape_dtype_and_count(compiled):
    _, inputs, art = compiled
    x = inputs[0].numpy()
    with pytest.raises(ArtifactError, match=r"expected shape \(2, 3, 16, 16\).*got shape \(1,"):
        art(x[:1])
    with pytest.raises(ArtifactError, match="dtype float32.*dtype float64"):
        art(x.astype(np.float64))
    with pytest.raises(ArtifactError, match="expected 1 input"):
        art(x, x)


def test_rewrite_replaces_atomically_and_leaves_no_temp(compiled, tmp_path):
    model, inputs, _ = compiled
    out = tmp_path / "art"
    first = codegen.compile(model, inputs, out_dir=out)
    stamp = first.manifest["self_sha256"]
    second = codegen.compile(model, inputs, out_dir=out)
    assert second.path == out and load(out).manifest["self_sha256"] == second.manifest["self_sha256"]
    assert stamp  # both complete; no temp or backup directories are left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_refuses_to_replace_a_foreign_directory(compiled, tmp_path):
    model, inputs, _ = compiled
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a graphprune artifact"):
        codegen.compile(model, inputs, out_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_source_date_epoch_gives_byte_identical_artifacts(tmp_path, monkeypatch):
    """Reproducible builds: two builds of one model with SOURCE_DATE_EPOCH set are equal byte
    for byte, every file (the manifest's ``created`` is that instant, the npz has fixed zip
    timestamps). Built a second apart so a wall-clock timestamp anywhere would show."""
    import time

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    inputs = (torch.randn(2, 8),)
    a = codegen.compile(model, inputs, out_dir=tmp_path / "a")
    time.sleep(1.1)
    b = codegen.compile(model, inputs, out_dir=tmp_path / "b")
    assert a.manifest["created"] == "2023-11-14T22:13:20+00:00"
    files = sorted(p.name for p in a.path.iterdir())
    assert files == sorted(p.name for p in b.path.iterdir())
    for name in files:
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ArtifactError, match="SOURCE_DATE_EPOCH"):
        codegen.compile(model, inputs, out_dir=tmp_path / "c")
