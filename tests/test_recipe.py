"""Recipe validation: every mistake fails before any work, naming the key and the fix."""

import doctest
import json

import pytest

import graphprune.app.recipe as recipe_mod
from graphprune.ir.errors import ConfigError
from graphprune.app.recipe import load_recipe

BASE = {"model": "resnet_tiny", "out": "build/x"}


def test_doctests():
    result = doctest.testmod(recipe_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_defaults_are_filled_and_absent_steps_skipped():
    r = load_recipe({**BASE, "prune": {}})
    assert r["prune"]["ratio"] == 0.5 and r["prune"]["criterion"] == "l2"
    assert r["sparsify"] is None and r["calib"] is None
    assert r["compile"] == {"target": "llvm", "schedule": "ours", "kernels": "auto",
                            "int8_tolerance": None}
    assert r["verify"]["atol"] == 1e-4 and r["verify"]["enabled"] is True


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "prnue": {}}, "prnue: unknown key; did you mean 'prune'?"),
    ({**BASE, "prune": {"ratoi": 0.3}}, "prune.ratoi: unknown key; did you mean 'ratio'?"),
    ({**BASE, "sparsify": {"patern": "2:4"}}, "did you mean 'pattern'?"),
    ({**BASE, "inputs": {"x": {"shap": [1, 2]}}}, "inputs.x.shap: unknown key; did you mean"),
    ({**BASE, "zzz": 1}, "zzz: unknown key; known keys:"),
    ({"out": "x"}, "model: missing"),
    ({**BASE, "prune": {"ratio": "half"}}, "prune.ratio: expected float, got str 'half'"),
    ({**BASE, "prune": {"round_to": 2.5}}, "prune.round_to: expected int"),
    ({**BASE, "prune": {"heads": "yes"}}, "prune.heads: expected bool"),
    ({**BASE, "prune": {"ratio": True}}, "prune.ratio: expected float, got bool"),
    ({**BASE, "prune": {"ratio": 1.0}}, "prune.ratio: 1.0 is out of range [0.0, 1.0)"),
    ({**BASE, "prune": {"scope": "globl"}}, "did you mean 'global'?"),
    ({**BASE, "prune": 0.3}, "prune: expected a mapping"),
    ({**BASE, "inputs": {"x": [1, 0]}}, "inputs.x.shape: expected a list of positive integers"),
    ({**BASE, "inputs": {"x": {"shape": [1], "dtype": "f32"}}}, "inputs.x.dtype"),
    ({**BASE, "compile": {"target": "llvn"}}, "did you mean 'llvm'?"),
])  # fmt: skip
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(raw)
    assert message in str(e.value)


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "prune": {"ratio": 0.3, "target_macs": 0.5}},
     "prune.ratio contradicts prune.target_macs"),
    ({**BASE, "prune": {"target_macs": 0.5, "target_params": 0.5}}, "give one"),
    ({**BASE, "prune": {"ratio": 0.2, "drop_blocks": 1}}, "drop_blocks"),
    ({**BASE, "sparsify": {"pattern": "2:4", "sparsity": 0.3}},
     "sparsify.sparsity 0.3 contradicts sparsify.pattern '2:4'"),
    ({**BASE, "sparsify": {"pattern": "4:2"}}, "0 < N < M"),
    ({**BASE, "sparsify": {"pattern": "diagonal"}}, "use 'unstructured', 'N:M'"),
    ({**BASE, "prune": {"criterion": "taylor"}}, "reads calibration data: add a calib:"),
    ({**BASE, "sparsify": {"method": "wanda"}}, "reads calibration data"),
    ({**BASE, "model": "m.onnx", "sparsify": {"method": "synflow"}}, "is torch-only"),
])  # fmt: skip
def test_contradictions(raw, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(raw)
    assert message in str(e.value)


def test_target_alone_is_fine_and_nm_implies_sparsity():
    r = load_recipe({**BASE, "prune": {"target_macs": 0.5}, "sparsify": {"pattern": "2:4",
                                                                         "sparsity": 0.5}})  # fmt: skip
    assert r["prune"]["target_macs"] == 0.5


def test_yaml_file_paths_resolve_against_the_recipe_folder(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    f = sub / "r.yaml"
    f.write_text("model: ../m.onnx\ninputs: {x: [2, 3]}\ncalib: {source: data/c.npz}\n"
                 "verify: {atol: 1e-3}\nout: ../build/a\n")  # fmt: skip
    r = load_recipe(f)
    assert r["model"] == str(tmp_path / "m.onnx")
    assert r["out"] == str(tmp_path / "build" / "a")
    assert r["calib"]["source"] == str(sub / "data" / "c.npz")
    assert r["verify"]["atol"] == 1e-3  # YAML 1.1 reads 1e-3 as a string; accepted as a float
    assert r["inputs"]["x"] == {"shape": [2, 3], "dtype": "float32", "low": 0, "high": 100}
    assert load_recipe(json.loads(r.to_json())).to_dict() == r.to_dict()  # resolved is a fixpoint


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    badj = tmp_path / "bad.json"
    badj.write_text('{"model": }')
    with pytest.raises(ConfigError, match=r"bad.json:1:\d+: not valid JSON"):
        load_recipe(badj)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_recipe(empty)
    with pytest.raises(ConfigError, match="prune.ratoi"):  # the file name leads the message
        (tmp_path / "t.yaml").write_text("model: resnet_tiny\nprune: {ratoi: 0.3}\n")
        load_recipe(tmp_path / "t.yaml")
