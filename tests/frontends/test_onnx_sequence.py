"""A symbolic sequence axis through ONNX capture and write-back (issue 15).

Decoders exported by optimum or the legacy exporter compute a causal mask (``seq × seq``) and an
index into the flattened ``batch × seq`` attention mask from the input's shape; folded at the
analysed sizes they become constants that follow the sequence along two axes. Capture replays the
exporter's own subgraph for them (:mod:`graphprune.frontends.onnx.replay`), so the pruned model
keeps ``sequence_length`` symbolic. Where a dim really cannot stay symbolic (a baked mask of a
fixed size, a Pad that folds away at one size and not at another) it falls back to static at
its example size, named with the reason in ``pg.static_axes``, never a refusal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from frontends.onnx_forms import signatures
from frontends.test_onnx_optimum import DATA, GROUPS, feeds
from torch import nn

import graphprune as gp
from graphprune import models
from graphprune.frontends.onnx.session import run_onnx
from graphprune.models.hf import TensorOutputs
from graphprune.testing.oracle_onnx import run_oracle_onnx

SIZES = ((3, 40), (1, 5))  # (batch, sequence) besides the analysed (2, 16)


def at(f: dict[str, np.ndarray], batch: int, seq: int, pad: int = 0) -> dict[str, np.ndarray]:
    """``f`` at another batch and sequence length (ids repeated, positions counted); the last
    ``pad`` positions of the first row masked out."""
    out = {}
    for k, v in f.items():
        if k == "position_ids":
            out[k] = np.tile(np.arange(seq, dtype=v.dtype), (batch, 1))
        else:
            out[k] = np.resize(v, (batch, seq)).astype(v.dtype)
    if pad and "attention_mask" in out:
        out["attention_mask"][0, -pad:] = 0
    return out


def dims(model) -> list[list]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)]  # fmt: skip


def check_sequence_symbolic(path: str, f: dict[str, np.ndarray], groups: dict[int, int] | None):
    """Capture with every dim symbolic, the same groups as at a fixed length, a rebuild (ratio 0)
    equal to the original at other sizes (a padded mask too), a pruned model that keeps the
    dim_params and runs at two batches and two lengths, and the oracle on the smallest and the
    largest group (at the analysed and at the range's other sizes)."""
    pg = gp.capture(path, f)
    assert pg.static_axes == {}
    assert len({a.name for a in pg.dynamic_axes}) == 2  # batch and sequence
    prunable = [g for g in gp.groups(pg) if g.prunable]
    if groups is not None:
        assert Counter(g.size for g in prunable) == Counter(groups), gp.explain(pg)
    same = gp.prune(path, f, ratio=0.0, graph=pg)
    for batch, seq in SIZES:
        x = at(f, batch, seq, pad=seq // 4)
        np.testing.assert_allclose(run_onnx(same.model, x)[0], run_onnx(path, x)[0],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    res = gp.prune(path, f, ratio=0.3, graph=pg)
    assert res.report.params_after < res.report.params_before
    def params(model) -> list[list[str]]:
        return [[p for p in d if isinstance(p, str)] for d in dims(model)]

    assert params(res.model) == params(onnx.load(path))  # the same dim_params, in and out
    for batch, seq in SIZES:
        (out, *_) = run_onnx(res.model, at(f, batch, seq))
        assert out.shape[:2] == (batch, seq) and np.isfinite(out).all()
    for g in (min(prunable, key=lambda g: g.size), max(prunable, key=lambda g: g.size)):
        run_oracle_onnx(pg, g.id, feeds=f).assert_close(atol=5e-5, rtol=1e-4)
    return pg


def test_gpt2_optimum_prunes_with_sequence_length_symbolic():
    pg = check_sequence_symbolic(str(DATA / "gpt2.onnx"), feeds("gpt2"), GROUPS["gpt2"])
    # the causal mask and the flattened-mask index are rebuilt, not frozen at 16 positions
    assert len(pg.source.dynamic.replay) >= 2


@pytest.mark.heavy
def test_llama_optimum_prunes_with_sequence_length_symbolic():
    check_sequence_symbolic(str(DATA / "llama.onnx"), feeds("llama"), GROUPS["llama"])


def _legacy(name: str, path) -> tuple[str, dict[str, np.ndarray], torch.nn.Module]:
    """``name``'s HF model with an attention mask, exported by the legacy exporter with batch
    and sequence dynamic."""
    model, inputs = models.get(name)
    names = ("input_ids", "attention_mask")
    wrapped = TensorOutputs(model.model, names, model.output_names[:1]).eval()
    x = (inputs[0], torch.ones_like(inputs[0]))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(wrapped, x, str(path), dynamo=False, opset_version=17,
                          input_names=list(names), output_names=["out"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "out": {0: "batch", 1: "seq"}})  # fmt: skip
    return str(path), {n: t.numpy() for n, t in zip(names, x)}, wrapped


def test_legacy_bert_with_attention_mask_keeps_seq(tmp_path):
    path, f, _ = _legacy("hf_bert_tiny", tmp_path / "bert.onnx")
    pg = check_sequence_symbolic(path, f, None)
    fixed = gp.capture(path, f, dynamic_shapes={"seq": (16, 16)})
    assert signatures(pg) == signatures(fixed)  # symbolic or not, the same groups


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["hf_gpt2_tiny", "hf_llama_tiny"])
def test_legacy_decoders_with_attention_mask_keep_seq(name, tmp_path):
    path, f, _ = _legacy(name, tmp_path / "m.onnx")
    pg = check_sequence_symbolic(path, f, None)
    assert signatures(pg) == signatures(gp.capture(path, f, dynamic_shapes={"seq": (16, 16)}))


# --- falling back to static ---------------------------------------------------------------------


class PadToWindow(nn.Module):
    """Pads the sequence to a multiple of a window of 4 (Swin's pad): at length 16 the pads fold
    to zero and the Pad disappears, at 17 it stays, so the model folds to two graphs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        h = self.a(x)
        h = F.pad(h, (0, 0, 0, (4 - h.shape[1] % 4) % 4))
        return self.b(h.reshape(h.shape[0], -1, 4, 12).mean(2))


class BakedMask(nn.Module):
    """Attention with a causal mask buffer of 16 positions: the model runs at length 16 only."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 12),
                                          nn.Linear(12, 8))  # fmt: skip
        self.register_buffer("mask", torch.full((16, 16), float("-inf")).triu(1))

    def forward(self, x):
        a = self.q(x) @ self.k(x).transpose(1, 2) + self.mask
        return self.o(a.softmax(-1) @ self.v(x))


@pytest.mark.parametrize("module, out_len, why", [
    (PadToWindow, 4, r"folds to different graphs at two sizes of 'seq' \(node .*Pad"),
    (BakedMask, 16, r"folds to different graphs at two sizes of 'seq'"),
])  # fmt: skip
def test_sequence_that_cannot_stay_symbolic_falls_back_to_static(module, out_len, why, tmp_path):
    torch.manual_seed(0)
    model, x = module().eval(), torch.randn(2, 16, 8)
    path = str(tmp_path / "m.onnx")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"},
                                                            "y": {0: "batch", 1: "seq"}})  # fmt: skip
    pg = gp.capture(path, [x.numpy()])
    assert [(a.input, a.axis, a.name) for a in pg.dynamic_axes] == [("x", 0, "batch")]
    assert list(pg.static_axes) == ["x[1]"]
    assert re.search(why, pg.static_axes["x[1]"])
    assert "falls back to static at its example size 16" in pg.static_axes["x[1]"]
    res = gp.prune(path, [x.numpy()], ratio=0.3)
    assert "x[1]" in res.report.to_text()
    assert dims(res.model) == [["batch", 16, 8], ["batch", out_len, 8]]  # the batch stays
    for batch in (1, 3):
        xb = torch.randn(batch, 16, 8)
        (y,) = run_onnx(res.model, [xb.numpy()])
        assert y.shape == (batch, out_len, 8)
    g = max((g for g in gp.groups(pg) if g.prunable), key=lambda g: g.size)
    run_oracle_onnx(pg, g.id, feeds={"x": x.numpy()}).assert_close(atol=2e-5, rtol=1e-4)
