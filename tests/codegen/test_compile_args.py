"""Compile's arguments: a manifest's target builds the same target again (a replay compiles
for it); an out_dir that cannot take an artifact is refused up front."""

from graphprune.codegen.target import make_target, target_to_dict


def test_target_to_dict_round_trips_through_make_target():
    for spec in ("llvm", {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}):
        target = make_target(spec)
        again = make_target(target_to_dict(target))
        assert str(again) == str(target)
        assert target_to_dict(again) == target_to_dict(target)


def test_compile_refuses_an_out_dir_that_cannot_take_the_artifact_before_building(tmp_path):
    import pytest
    import torch

    import graphprune as gp

    model, x = torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),)
    afile = tmp_path / "file"
    afile.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for out, says in ((afile, "existing file"), (afile / "art", "is a file"),
                      (folder, "not a graphprune artifact")):  # fmt: skip
        with pytest.raises(gp.GraphPruneError, match=says):
            gp.compile(model, x, out_dir=out)
    assert afile.read_text() == "x" and (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no staging left
