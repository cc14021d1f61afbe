"""``compile(tune=True, trials=N)``: MetaSchedule with an on-disk database that is reused.

A two-Linear model, 4 trials in all (about 10 s here). Checks: outputs equal PyTorch's; the
database gains records on the first compile and none on the second (no new trials); the manifest
names the cost model the search used (none when no search ran); a database
record is applied, and still correct, where it is faster than our rules' measured time.
"""

from __future__ import annotations

import json

import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs

from graphprune import codegen
from graphprune.ir.errors import ConfigError


def _records(db) -> int:
    path = db / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    return model.eval(), (torch.randn(4, 16),)


def test_tuning_database_is_kept_and_reused(mlp, tmp_path):
    from graphprune.codegen.tuning import check_tuning_available, cost_model_name

    try:
        check_tuning_available()
    except ConfigError as e:
        pytest.skip(str(e))  # the apache-tvm-ffi release whose save_json segfaults
    model, inputs = mlp
    db = tmp_path / "db"
    first = codegen.compile(model, inputs, out_dir=tmp_path / "a", tune=True, trials=4,
                            tuning_dir=db)  # fmt: skip
    assert_matches(first(*inputs), torch_outputs(model, inputs))
    tuning = first.manifest["tuning"]
    assert tuning["tasks"] == 2 and tuning["reused_tasks"] == 0 and tuning["new_records"] > 0
    # The manifest names the cost model the search used (xgboost is optional: "random" without)
    assert tuning["cost_model"] == cost_model_name() and tuning["cost_model"] in ("xgb", "random")
    n = _records(db)
    assert n == tuning["new_records"]

    second = codegen.compile(model, inputs, out_dir=tmp_path / "b", tune=True, trials=4,
                             tuning_dir=db)  # fmt: skip
    assert second.manifest["tuning"]["new_records"] == 0
    assert second.manifest["tuning"]["reused_tasks"] == 2
    assert second.manifest["tuning"]["cost_model"] is None  # no search ran
    assert _records(db) == n  # no new trials
    assert_matches(second(*inputs), torch_outputs(model, inputs))

    # Where a record beats our rules' measured time it is applied (here: pretend ours is slow).
    ours = db / "graphprune_rules.json"
    ours.write_text(json.dumps({k: 1.0 for k in json.loads(ours.read_text())}))
    third = codegen.compile(model, inputs, out_dir=tmp_path / "c", tune=True, trials=4,
                            tuning_dir=db)  # fmt: skip
    assert sorted(third.manifest["tuning"]["metaschedule"]) == [
        "fused_matmul1_add1", "fused_matmul_add_relu"
    ]  # fmt: skip
    assert {r["rule"] for r in third.manifest["kernels"].values()} == {"MetaSchedule"}
    assert _records(db) == n
    assert_matches(third(*inputs), torch_outputs(model, inputs))


def test_tuning_arguments(mlp, tmp_path):
    model, inputs = mlp
    with pytest.raises(ConfigError, match="trials > 0"):
        codegen.compile(model, inputs, out_dir=tmp_path / "a", tune=True)
    with pytest.raises(ConfigError, match="without tune=True"):
        codegen.compile(model, inputs, out_dir=tmp_path / "a", trials=8)


def test_tuning_a_dynamic_artifact_is_refused(mlp, tmp_path):
    """MetaSchedule measures each candidate on random inputs of the kernel's exact shapes
    (``ArgInfo.from_entry_func``), which a symbolic extent does not have: tuning would need a
    kernel per shape bucket. The compile refuses before building and writes nothing."""
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    model, inputs = mlp
    dyn = ({0: torch.export.Dim("batch", min=1, max=8)},)
    with pytest.raises(ConfigError, match=r"dynamic_shapes with .*tune=True.*tuning specialise"):
        codegen.compile(model, inputs, out_dir=tmp_path / "a", tune=True, trials=4,
                        tuning_dir=tmp_path / "db", dynamic_shapes=dyn)  # fmt: skip
    assert not (tmp_path / "a").exists()
    # Why: the measured arguments of a symbolic kernel have no concrete shape.
    n = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n, 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(o)
    mod = relax.transform.LegalizeOps()(bb.get())
    func = next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    task = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with pytest.raises(TypeError, match="IntImm"):
        ms.arg_info.ArgInfo.from_entry_func(task)
