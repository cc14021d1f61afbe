"""A manifest's target description builds the same target again (a replay compiles for it)."""

from graphprune.codegen.target import make_target, target_to_dict


def test_target_to_dict_round_trips_through_make_target():
    for spec in ("llvm", {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}):
        target = make_target(spec)
        again = make_target(target_to_dict(target))
        assert str(again) == str(target)
        assert target_to_dict(again) == target_to_dict(target)
