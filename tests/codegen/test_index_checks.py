"""Bounds checks of every gather whose index derives from a model input (codegen/index_checks):
``torch.gather`` (``gather_elements``), ``w[i, j]`` (``index_tensor``, negative indices
counted from the end as in PyTorch), an index into an activation with a symbolic extent, and
ONNX ``GatherND`` (``gather_nd``, one extent per index column).

Each artifact matches torch / onnxruntime in range and raises an error naming the input out of
range; the indices that read far outside the tensor (2**20, 2**31) run in a fresh process with
plain TVM (the crash case), which must survive them and still compute a good call after.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from codegen_helpers import assert_matches, torch_outputs
from onnx import TensorProto, helper, numpy_helper
from test_codegen_dynamic import run_pure_tvm

from graphprune import codegen
from graphprune.ir.errors import ArtifactError

Dim = torch.export.Dim
FAR = (2**20, 2**31 - 1)  # far outside: unmapped memory without the check


class Gather(torch.nn.Module):
    """``torch.gather`` along axis 1 of a (3, 10) weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 10))

    def forward(self, idx):
        return torch.gather(self.w, 1, idx) * 2


class Pairs(torch.nn.Module):
    """``w[i, j]`` on a (5, 10, 4) weight: one index tensor per leading axis."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(5, 10, 4))

    def forward(self, i, j):
        return self.w[i, j] + 1


class LastToken(torch.nn.Module):
    """``x[arange(batch), pos]``: GPT-2's pooling of the last token, the position axis
    symbolic."""

    def forward(self, x, pos):
        return x[torch.arange(x.shape[0]), pos]


@pytest.fixture(scope="module")
def gather(tmp_path_factory):
    torch.manual_seed(0)
    model = Gather().eval()
    art = codegen.compile(model, (torch.tensor([[1], [2], [3]]),),
                          out_dir=tmp_path_factory.mktemp("gather") / "art")  # fmt: skip
    return model, art


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    torch.manual_seed(0)
    model = Pairs().eval()
    batch = Dim("n", min=1, max=16)
    art = codegen.compile(model, (torch.tensor([1, 2]), torch.tensor([3, 4])),
                          out_dir=tmp_path_factory.mktemp("pairs") / "art",
                          dynamic_shapes=({0: batch}, {0: batch}))  # fmt: skip
    return model, art


def test_gather_elements_is_checked(gather):
    model, art = gather
    assert art.manifest["index_inputs"] == [
        {"input": "idx", "range": [0, 10], "indexes": "w", "axis": 1, "direct": True}
    ]
    good = (torch.tensor([[0], [9], [4]]),)
    assert_matches(art(*good), torch_outputs(model, good))
    for bad in (10, -1):
        ids = torch.tensor([[0], [bad], [4]])
        with pytest.raises(ArtifactError, match=rf"input 'idx': index {bad} at position \(1, 0\) "
                                                r"is outside \[0, 10\)"):  # fmt: skip
            art(ids)
        with pytest.raises(RuntimeError, match="out of bounds"):  # what PyTorch does
            model(ids)


def test_index_tensor_counts_negative_indices_from_the_end_like_torch(pairs):
    model, art = pairs
    assert [(r["input"], r["range"], r["axis"]) for r in art.manifest["index_inputs"]] == [
        ("i", [-5, 5], 0), ("j", [-10, 10], 1)
    ]  # fmt: skip
    for xs in ((torch.tensor([0, 4, -5]), torch.tensor([-1, 9, 0])),
               (torch.tensor([2]), torch.tensor([-10]))):  # fmt: skip
        assert_matches(art(*xs), torch_outputs(model, xs))
    with pytest.raises(ArtifactError, match=r"input 'j': index 10 at position \(1,\) is outside "
                                            r"\[-10, 10\)"):  # fmt: skip
        art(torch.tensor([0, 1]), torch.tensor([0, 10]))
    with pytest.raises(IndexError):
        model(torch.tensor([0, 1]), torch.tensor([0, 10]))


def test_index_into_a_symbolic_extent_is_checked_in_the_module(tmp_path):
    torch.manual_seed(0)
    model = LastToken().eval()
    b, s = Dim("batch", min=1, max=8), Dim("seq", min=2, max=32)
    art = codegen.compile(model, (torch.randn(2, 5, 3), torch.tensor([1, 4])),
                          out_dir=tmp_path / "art",
                          dynamic_shapes=({0: b, 1: s}, {0: b}))  # fmt: skip
    rec = art.manifest["index_inputs"]
    assert rec == [{"input": "pos", "range": ["-seq", "seq"], "indexes": "x", "axis": 1,
                    "direct": False}]  # fmt: skip
    x = torch.randn(3, 7, 3)
    for pos in ([0, 6, -7], [-1, 3, 2]):
        xs = (x, torch.tensor(pos))
        assert_matches(art(*xs), torch_outputs(model, xs))
    # The extent is the call's own sequence length, 7: position 7 is out of range.
    with pytest.raises(ArtifactError, match=r"input 'pos' has an index outside \[-seq, seq\) "
                                            r"\(index_tensor of x on axis 1\)"):  # fmt: skip
        art(x, torch.tensor([0, 7, 1]))


def _gather_nd_onnx(path):
    """``GatherND(w, idx)``: ``w`` a (5, 10, 4) initializer, ``idx`` an (n, 2) int64 input
    (one (row, column) pair per output row, each of its two columns indexing its own axis).
    Then ``GatherElements(w2, idx2)`` on a second input, negative indices allowed (ONNX)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 10, 4)).astype(np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GatherND", ["w", "idx"], ["y"]),
         helper.make_node("GatherElements", ["w2", "idx2"], ["z"], axis=1)],
        "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n", 2]),
         helper.make_tensor_value_info("idx2", TensorProto.INT64, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_onnx_gather_nd_checks_each_index_column_and_survives_far_indices(tmp_path):
    import onnxruntime as ort

    path = _gather_nd_onnx(tmp_path / "g.onnx")
    art = codegen.compile(path, out_dir=tmp_path / "art", dynamic_shapes={"n": (1, 16)})
    ranges = {(r["input"], r["axis"]): r["range"] for r in art.manifest["index_inputs"]}
    assert ranges == {("idx", 0): [0, 5], ("idx", 1): [0, 10], ("idx2", 1): [0, 6]}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    idx2 = np.array([[0, -1], [5, -6], [2, 3]], np.int64)  # negative: ONNX counts from the end
    good = (np.array([[0, 0], [4, 9], [2, 5]], np.int64), idx2)
    want = sess.run(None, {"idx": good[0], "idx2": idx2})
    assert_matches(art(*good), want)
    with pytest.raises(ArtifactError, match=r"input 'idx' has an index outside \[0, 10\) "
                                            r"\(gather_nd of w on axis 1\)"):  # fmt: skip
        art(np.array([[0, 0], [4, 10]], np.int64), idx2)
    with pytest.raises(ArtifactError, match=r"input 'idx2' has an index outside \[0, 6\)"):
        art(good[0], np.array([[0, 6], [0, 0], [0, 0]], np.int64))
    calls = [(np.array([[0, 0], [far, 1]], np.int64), idx2) for far in FAR]
    calls += [(np.array([[0, 0], [1, far]], np.int64), idx2) for far in FAR]
    outs, proc = run_pure_tvm(art.path, [*calls, good], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == len(calls), proc.stdout
    assert all("input 'idx' has an index outside [0, " in line for line in errors), errors
    assert_matches(tuple(outs[-1]), want)


def test_far_indices_do_not_crash_plain_tvm(gather, pairs, tmp_path):
    """gather_elements and index_tensor, in a fresh process with only TVM: indices 2**20 and
    2**31 - 1 raise an error naming the input; the process survives."""
    for (model, art), make in (
        (gather, lambda v: (torch.tensor([[0], [v], [1]]),)),
        (pairs, lambda v: (torch.tensor([0, 1]), torch.tensor([v, 2]))),
    ):
        calls = [make(v) for v in (*FAR, -(2**31))]
        good = make(3)
        (where := tmp_path / art.path.parent.name).mkdir()
        outs, proc = run_pure_tvm(art.path, [*calls, good], where)
        assert proc.returncode == 0, proc.stderr[-2000:]
        errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
        assert len(errors) == len(calls), proc.stdout
        assert all("graphprune index check: input " in line for line in errors), errors
        assert_matches(tuple(outs[-1]), torch_outputs(model, good))
