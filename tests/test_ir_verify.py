"""The IR verifier: zoo captures pass; each hand-corrupted graph fails naming the node at fault.

Every corruption test starts from a graph that verifies (``tiny()``), breaks one invariant and
checks that the error names the node (or weight) and the kind of fault.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import export_onnx

import graphprune as gp
from graphprune import models
from graphprune.ir import OpNode, PruneGraph, Value, VerificationError, verify


def tiny() -> PruneGraph:
    #  x ─ fc1(w1, b1) ─ h ─ relu ─ r ─ fc2(w2) ─ y
    pg = PruneGraph("torch", "by hand", "tiny")
    pg.add_value("x", Value((2, 4), "float32", "input"))
    for name, shape in (("w1", (6, 4)), ("b1", (6,)), ("w2", (3, 6))):
        pg.add_value(name, Value(shape, "float32", "param", param=f"{name}.weight"))
        pg.weights[f"{name}.weight"] = np.zeros(shape, np.float32)
    for name, shape, role in (("h", (2, 6), "activation"), ("r", (2, 6), "activation"),
                              ("y", (2, 3), "output")):  # fmt: skip
        pg.add_value(name, Value(shape, "float32", role))
    pg.add_op("fc1", OpNode("linear", "aten.linear.default"), ["x", "w1", "b1"], ["h"])
    pg.add_op("relu", OpNode("activation", "aten.relu.default"), ["h"], ["r"])
    pg.add_op("fc2", OpNode("linear", "aten.linear.default"), ["r", "w2"], ["y"])
    pg.inputs, pg.outputs = ["x"], ["y"]
    return pg


@pytest.mark.parametrize("name,frontend", [("resnet_tiny", "torch"), ("resnet_tiny", "onnx"),
                                           ("llama_tiny", "torch"), ("densenet_tiny", "onnx")])
def test_zoo_captures_verify(name, frontend):
    model, inputs = models.get(name)
    pg = gp.capture(model if frontend == "torch" else export_onnx(model, inputs),
                    inputs if frontend == "torch" else None)  # fmt: skip
    verify(pg)
    assert any(True for _ in pg.params())  # the weight checks had something to check


def test_masks_recorded_by_sparsify_verify():
    model, inputs = models.get("resnet_tiny")
    pg = gp.capture(model, inputs)
    for p in list(pg.params())[:3]:
        name = pg.value(p).param
        pg.masks[name] = np.ones(pg.weights[name].shape, dtype=bool)
    verify(pg)


def test_hand_built_graph_verifies():
    verify(tiny())


def test_cycle_names_a_node_on_it():
    pg = tiny()
    pg.nx.add_edge("r", "fc1", slot=3, shape=(2, 6), dtype="float32")  # fc1 reads relu's output
    with pytest.raises(VerificationError, match=r"cycle through '(fc1|h|relu|r)'"):
        verify(pg)


def test_op_joined_to_op_is_not_bipartite():
    pg = tiny()
    pg.nx.add_edge("fc1", "relu", slot=1, shape=(2, 6), dtype="float32")
    msg = r"op 'fc1' \(linear\) is joined directly to op 'relu'"
    with pytest.raises(VerificationError, match=msg):
        verify(pg)


def test_value_joined_to_value_is_not_bipartite():
    pg = tiny()
    pg.nx.add_edge("x", "h", slot=0, shape=(2, 4), dtype="float32")
    with pytest.raises(VerificationError, match=r"value 'x' is joined directly to value 'h'"):
        verify(pg)


def test_edge_shape_differs_from_its_value():
    pg = tiny()
    pg.nx.nodes["h"]["data"] = Value((2, 7), "float32")  # edges still say (2, 6)
    with pytest.raises(VerificationError, match=r"op 'fc1' \(linear\).*value 'h' is \(2, 7\)"):
        verify(pg)


def test_edge_dtype_differs_from_its_value():
    pg = tiny()
    pg.nx.nodes["r"]["data"] = Value((2, 6), "float16")
    with pytest.raises(VerificationError, match=r"op '(relu|fc2)'.*value 'r' is \(2, 6\) float16"):
        verify(pg)


def test_two_edges_at_one_slot():
    pg = tiny()
    pg.nx.add_edge("x", "fc2", slot=1, shape=(2, 4), dtype="float32")  # w2 is at slot 1 too
    with pytest.raises(VerificationError, match=r"op 'fc2' \(linear\) has two edges at slot 1"):
        verify(pg)


def test_value_with_two_producers():
    pg = tiny()
    pg.nx.add_edge("fc2", "r", index=1, shape=(2, 6), dtype="float32")
    with pytest.raises(VerificationError, match=r"value 'r' has 2 producers: \['fc2', 'relu'\]"):
        verify(pg)


def test_unknown_op_kind():
    pg = tiny()
    pg.op("relu").kind = "relu"
    with pytest.raises(VerificationError, match=r"op 'relu' has kind 'relu'"):
        verify(pg)


def test_node_without_payload():
    pg = tiny()
    pg.nx.add_node("stray")
    with pytest.raises(VerificationError, match=r"node 'stray' has no payload"):
        verify(pg)


def test_op_node_carrying_a_value_payload():
    pg = tiny()
    pg.nx.nodes["relu"]["data"] = Value((2, 6), "float32")
    with pytest.raises(VerificationError, match=r"node 'relu' is an op but carries a Value"):
        verify(pg)


def test_graph_output_that_is_not_a_value():
    pg = tiny()
    pg.outputs = ["fc2"]
    with pytest.raises(VerificationError, match=r"graph output 'fc2' is not a value node"):
        verify(pg)


def test_parameter_without_weight():
    pg = tiny()
    del pg.weights["w2.weight"]
    with pytest.raises(VerificationError, match=r"parameter value 'w2' names weight 'w2.weight'"):
        verify(pg)


def test_parameter_weight_of_another_shape():
    pg = tiny()
    pg.weights["b1.weight"] = np.zeros((5,), np.float32)
    with pytest.raises(VerificationError, match=r"parameter value 'b1' has shape \(6,\), its "
                                                r"weight 'b1.weight' \(5,\)"):  # fmt: skip
        verify(pg)


def test_mask_of_another_shape():
    pg = tiny()
    pg.masks["w1.weight"] = np.ones((4, 6), dtype=bool)
    with pytest.raises(VerificationError, match=r"mask of 'w1.weight' has shape \(4, 6\)"):
        verify(pg)


def test_mask_not_bool():
    pg = tiny()
    pg.masks["w1.weight"] = np.ones((6, 4), dtype=np.float32)
    with pytest.raises(VerificationError, match=r"mask of 'w1.weight' has dtype float32"):
        verify(pg)


def test_mask_of_no_weight():
    pg = tiny()
    pg.masks["w9.weight"] = np.ones((6, 4), dtype=bool)
    with pytest.raises(VerificationError, match=r"mask 'w9.weight' belongs to no weight"):
        verify(pg)
