"""Dynamic shapes through torch capture, prune and sparsify (issue 14).

Pruned models run at batch sizes (and sequence lengths) other than the example's, within the
declared ranges; the dead-channel oracle holds at several shapes; explicit ``torch.export.Dim``
ranges are honoured with a graphprune error outside them; an axis the model fixes falls back to
static with the reason in the report; a GraphModule result saves and reloads with
``torch.export`` in a fresh process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

import graphprune as gp
from graphprune import models
from graphprune.ir.errors import CaptureError, ConfigError
from graphprune.passes import cost
from graphprune.testing.oracle import inputs_at, run_oracle


class FlattenHead(nn.Module):
    """A CNN whose head reshapes to a hard-coded width: the batch is ``x.shape[0]`` (symbolic),
    the feature count a literal the writer must rewrite (so the result is a GraphModule)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 4).reshape(x.shape[0], 16 * 4 * 4)
        return self.fc2(torch.relu(self.fc1(x)))


class FixedBatch(nn.Module):
    """Hard-codes the batch (reshapes to 2 rows) and needs 4 tokens or more: torch.export
    specialises the batch and narrows the sequence range. The hidden width is a literal too,
    so the pruned result is a GraphModule."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] < 4:
            raise ValueError("needs 4 tokens or more")
        h = torch.relu(self.fc(self.emb(ids))).reshape(2, -1, 16)  # a literal width: GraphModule
        return self.out(h).reshape(2, -1)


def _flatten_head() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return FlattenHead().eval(), (torch.randn(2, 3, 8, 8),)


ZOO = {
    "resnet_tiny": lambda: models.get("resnet_tiny"),
    "vit_tiny": lambda: models.get("vit_tiny"),
    "llama_tiny": lambda: models.get("llama_tiny"),
    "flatten_head": _flatten_head,
}


def _check_rows(model: nn.Module, x: torch.Tensor) -> None:
    """The batch runs, and each row equals that row run alone (batch 1)."""
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == x.shape[0]
        for i in (0, x.shape[0] - 1):
            torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=list(ZOO))
def pruned(request):
    model, inputs = ZOO[request.param]()
    res = gp.prune(model, inputs, ratio=0.3)
    return request.param, res


def test_default_result_runs_at_other_batches(pruned):
    name, res = pruned
    axes = {(a.input, a.axis): a for a in res.report.dynamic_axes}
    (inp,) = res.graph.inputs
    assert axes[(inp, 0)].name == "batch" and axes[(inp, 0)].min == 1
    assert "dynamic axes: " in res.report.to_text()
    for b in (1, 3, 5):
        (x,), _ = inputs_at(res.graph, {"batch": b}, seed=b)
        _check_rows(res.model, x)
    if name == "llama_tiny":
        assert axes[(inp, 1)].name == "seq"
        for b, t in ((1, 3), (3, 9), (5, 31)):
            (x,), _ = inputs_at(res.graph, {"batch": b, "seq": t}, seed=t)
            assert res.model(x).shape[:2] == (b, t)


def test_graph_module_forms_keep_symbolic_batch(pruned):
    name, res = pruned
    want = {"resnet_tiny": "module", "vit_tiny": "graph_module", "llama_tiny": "graph_module",
            "flatten_head": "graph_module"}[name]  # fmt: skip
    assert res.report.form == want
    if want == "graph_module":
        assert "torch.export.save(res.exported_program()" in res.report.to_text()


@pytest.mark.parametrize("name", list(ZOO))
def test_oracle_at_two_shapes(name):
    model, inputs = ZOO[name]()
    pg = gp.capture(model, inputs)
    prunable = [g for g in gp.groups(pg) if g.prunable]
    assert prunable
    shapes = [{"batch": 1}, {"batch": 3, "seq": 5}]
    for g in prunable[:3]:
        r = run_oracle(pg, g.id, shapes=shapes)
        n_out = len(r.reference) // 3
        assert [a.shape[0] for a in r.reference[n_out:]] == [1] * n_out + [3] * n_out
        r.assert_close(atol=1e-4, rtol=1e-4)


def test_explicit_dims_are_honoured():
    model, (ids,) = models.get("llama_tiny")
    spec = {"input_ids": {0: Dim("b", min=1, max=4), 1: Dim("t", min=2, max=32)}}
    res = gp.prune(model, (ids,), ratio=0.3, dynamic_shapes=spec)
    ranges = {a.name: (a.min, a.max) for a in res.report.dynamic_axes}
    assert ranges == {"b": (1, 4), "t": (2, 32)}
    assert "input_ids[0] = b in [1, 4]" in res.report.to_text()
    assert res.model(torch.randint(0, 128, (4, 32))).shape == (4, 32, 128)
    with pytest.raises(ConfigError, match=r"'input_ids' axis 0 \(b\) is 5, outside the range \[1, 4\]"):
        res.model(torch.randint(0, 128, (5, 8)))
    with pytest.raises(ConfigError, match=r"axis 1 \(t\) is 33"):
        res.model(torch.randint(0, 128, (2, 33)))


def test_onnx_form_for_torch_is_refused():
    model, inputs = models.get("digits_cnn")
    with pytest.raises(ConfigError, match="torch.export.Dim"):
        gp.capture(model, inputs, dynamic_shapes={"batch": (1, 8)})


def test_spec_for_another_argument_is_named():
    model, inputs = models.get("digits_cnn")
    with pytest.raises(CaptureError, match=r"dynamic_shapes= does not fit DigitsCNN's inputs.*\['x'\]"):
        gp.capture(model, inputs, dynamic_shapes={"y": {0: Dim("b")}})


def test_impossible_explicit_dim_names_the_fix():
    with pytest.raises(CaptureError, match="Suggested fixes"):
        gp.capture(FixedBatch().eval(), (torch.randint(0, 50, (2, 6)),),
                   dynamic_shapes={"ids": {0: Dim("batch", min=1, max=8)}})  # fmt: skip


def test_specialised_axes_fall_back_with_reason():
    torch.manual_seed(0)
    model, ids = FixedBatch().eval(), torch.randint(0, 50, (2, 6))
    res = gp.prune(model, (ids,), ratio=0.5)
    static = res.report.static_axes
    assert "torch.export specialises it" in static["ids[0]"]
    assert "constant (2)" in static["ids[0]"]
    # The sequence axis stays dynamic, narrowed to what the model accepts (4 tokens or more).
    (seq,) = res.report.dynamic_axes
    assert (seq.axis, seq.min) == (1, 4) and "range narrowed by torch.export" in seq.note
    assert "ids[1]" not in static
    text = res.report.to_text()
    assert "static axis ids[0]" in text and "ids[1] = seq in [4, 2048]" in text
    with torch.no_grad():
        assert res.model(torch.randint(0, 50, (2, 9))).shape == (2, 36)
    assert res.report.form == "graph_module"
    with pytest.raises(ConfigError, match="'ids' axis 0 is 3, but that axis is static at 2"):
        res.model(torch.randint(0, 50, (3, 6)))


def test_example_batch_of_one_stays_static():
    model, (x,) = models.get("digits_cnn")
    pg = gp.capture(model, (x[:1],))
    assert pg.dynamic_axes == []
    assert "example size is 1" in pg.static_axes["x[0]"]


def test_static_capture_on_request():
    model, inputs = models.get("llama_tiny")
    pg = gp.capture(model, inputs, dynamic_shapes=False)
    assert pg.dynamic_axes == [] and pg.static_axes == {}
    assert all(pg.value(v).symbols is None for v in pg.values())
    assert cost.count(pg, at={"batch": 4}).macs == cost.count(pg).macs  # nothing to resize
    small = gp.remove_channels(pg, {next(g.id for g in gp.groups(pg) if g.prunable): [0]})
    with pytest.raises(ConfigError, match="'input_ids' axis 0 is 3, but that axis is static at 2"):
        small(torch.randint(0, 128, (3, 16)))


def test_values_carry_symbols_and_cost_at_a_stated_shape():
    model, inputs = models.get("llama_tiny")
    pg = gp.capture(model, inputs)
    out = pg.value(pg.outputs[0])
    assert out.shape == (2, 16, 128) and out.symbols == ("batch", "seq", None)
    assert pg.shape_at(pg.outputs[0], {"batch": 3, "seq": 7}) == (3, 7, 128)
    at_example = cost.count(pg)
    assert cost.count(pg, at={"batch": 2, "seq": 16}).macs == at_example.macs
    assert cost.count(pg, at={"batch": 4}).macs == 2 * at_example.macs  # linear in batch
    assert cost.count(pg, at={"seq": 32}).macs > 2 * at_example.macs  # attention: quadratic
    assert cost.count(pg, at={"batch": 4}).params == at_example.params


def test_sparsify_passes_dynamic_shapes():
    model, inputs = models.get("digits_cnn")
    spec = {"x": {0: Dim("n", min=1, max=16)}}
    res = gp.sparsify(model, inputs, sparsity=0.5, dynamic_shapes=spec)
    assert [(a.name, a.min, a.max) for a in res.graph.dynamic_axes] == [("n", 1, 16)]
    assert res.model(torch.randn(7, *inputs[0].shape[1:])).shape == (7, 10)


_LOAD = """
import sys, torch
ep = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(ep.module()(x), sys.argv[3])
print("graphprune" in sys.modules)
"""


def test_graph_module_saves_and_loads_in_fresh_process(tmp_path):
    model, inputs = models.get("llama_tiny")
    res = gp.prune(model, inputs, ratio=0.3)
    assert res.report.form == "graph_module"
    torch.export.save(res.exported_program(), tmp_path / "m.pt2")
    x = torch.randint(0, 128, (3, 7))
    torch.save(x, tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "m.pt2"),
                          str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), res.model(x))


class SymbolicOnlyFailure(nn.Module):
    """Captures at a concrete batch only (as code that checks for plain ints does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x.shape[0], int):
            raise TypeError(f"batch must be an int, not {type(x.shape[0]).__name__}")
        return self.fc(x)


def test_default_never_makes_a_model_uncapturable():
    pg = gp.capture(SymbolicOnlyFailure().eval(), (torch.randn(2, 4),))
    assert pg.dynamic_axes == []
    assert "captured static" in pg.static_axes["x[0]"]
    assert "batch must be an int, not SymInt" in pg.static_axes["x[0]"]


class _HardCodedWithMask(nn.Module):
    """Forward reshapes to fixed sizes (so the result is a GraphModule) and takes an optional
    mask."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, mask=None):
        h = self.a(x).relu().reshape(x.shape[0], 4, 4).reshape(x.shape[0], 16)
        if mask is not None:
            h = h * mask[:, :1]
        return self.b(h)


def test_graph_module_names_an_input_that_was_not_captured():
    torch.manual_seed(0)
    res = gp.prune(_HardCodedWithMask().eval(), (torch.randn(2, 8),), ratio=0.5)
    assert res.report.form == "graph_module"
    x = torch.randn(3, 8)
    assert res.model(x).shape == (3, 8)
    with pytest.raises(gp.ConfigError, match=r"'mask'.*example inputs of gp.prune"):
        res.model(x, mask=torch.ones(3, 1))
    with pytest.raises(gp.ConfigError, match="too many positional"):
        res.model(x, torch.ones(3, 1))
