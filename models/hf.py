"""Hugging Face ``transformers`` models of the zoo, with small random configs.

These are the models users actually bring, so capture has to survive their idioms: attention
masks built from ``attention_mask``, ``expand``+``reshape`` GQA in LLaMA, ``Conv1D`` (a
transposed Linear) in GPT-2, tied embeddings. Each factory returns ``(model, example_inputs)``
where the model is a ``TensorOutputs`` wrapper whose forward takes and returns plain tensors
(no ``ModelOutput``, no cache), so ``torch.export`` and ONNX export see a flat signature.

Export them under ``torch.no_grad()``: LLaMA's rotary embedding is decorated with ``no_grad``,
which with grad enabled shows up in the exported graph as a ``wrap_with_set_grad_enabled``
higher-order op around a submodule. Eval-mode ``aten.dropout`` nodes (``train=False``) remain
in BERT/GPT-2/ViT graphs and are identities.

``transformers`` is imported inside the factories: ``import graphprune.models`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TensorOutputs",
    "hf_bert_base",
    "hf_bert_tiny",
    "hf_gpt2_tiny",
    "hf_llama_tiny",
    "hf_vit_tiny",
    "pretrained_tiny",
]

Example = tuple[nn.Module, tuple[Tensor, ...]]

# Every factory takes ``attn_implementation``: "sdpa" (default) lowers to one
# aten.scaled_dot_product_attention node, "eager" spells attention out (matmul, softmax). Both pass
# torch.export and ONNX dynamo export for all four tiny models.


class TensorOutputs(nn.Module):
    """Call a ``transformers`` model with keyword tensors and return selected outputs as a tuple.

    Parameters
    ----------
    model : nn.Module
        A ``transformers`` model.
    input_names : sequence of str
        Keyword names of the positional tensors ``forward`` receives.
    output_names : sequence of str
        Attributes of the returned ``ModelOutput`` to return, in order.
    """

    def __init__(
        self, model: nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        kwargs: dict[str, Any] = dict(zip(self.input_names, inputs, strict=True))
        out = self.model(**kwargs, return_dict=True)
        return tuple(getattr(out, name) for name in self.output_names)


def _build(
    seed: int,
    make: Callable[[], nn.Module],
    make_inputs: Callable[[], tuple[Tensor, ...]],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
) -> Example:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make().eval()
        inputs = make_inputs()
    return TensorOutputs(model, input_names, output_names).eval(), inputs


def _token_inputs(vocab_size: int, seq_len: int) -> Callable[[], tuple[Tensor, ...]]:
    def make() -> tuple[Tensor, ...]:
        ids = torch.randint(0, vocab_size, (2, seq_len), dtype=torch.int64)
        return ids, torch.ones(2, seq_len, dtype=torch.int64)

    return make


def _bert(seed: int, seq_len: int, attn_implementation: str, **config: Any) -> Example:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(attn_implementation=attn_implementation, **config)
    return _build(
        seed,
        lambda: BertModel(cfg),
        _token_inputs(cfg.vocab_size, seq_len),
        ("input_ids", "attention_mask"),
        ("last_hidden_state", "pooler_output"),
    )


def hf_bert_tiny(seed: int = 0, attn_implementation: str = "sdpa") -> Example:
    """``BertModel``: hidden 64, 2 layers, 4 heads, intermediate 128, vocab 128.

    Inputs ``input_ids`` and ``attention_mask``, both int64 ``(2, 16)``; outputs
    ``last_hidden_state (2, 16, 64)`` and ``pooler_output (2, 64)``.
    """
    return _bert(
        seed,
        16,
        attn_implementation,
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def hf_bert_base(seed: int = 0, attn_implementation: str = "sdpa") -> Example:
    """BERT-base shape (768 hidden, 12 layers, 12 heads, ~110M parameters), inputs ``(2, 128)``.

    Random weights; for benchmarks only.
    """
    return _bert(seed, 128, attn_implementation)


def hf_gpt2_tiny(seed: int = 0, attn_implementation: str = "sdpa") -> Example:
    """``GPT2LMHeadModel`` (tied lm_head): n_embd 64, 2 layers, 4 heads, vocab 128.

    Inputs ``input_ids`` and ``attention_mask`` int64 ``(2, 16)``; output ``logits (2, 16, 128)``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    return _build(
        seed,
        lambda: GPT2LMHeadModel(cfg),
        _token_inputs(cfg.vocab_size, 16),
        ("input_ids", "attention_mask"),
        ("logits",),
    )


def hf_llama_tiny(seed: int = 0, attn_implementation: str = "sdpa") -> Example:
    """``LlamaForCausalLM``: hidden 64, 2 layers, 4 heads / 2 kv heads, intermediate 128.

    Vocab 128, no cache. Input ``input_ids`` int64 ``(2, 16)``; output ``logits (2, 16, 128)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    return _build(
        seed,
        lambda: LlamaForCausalLM(cfg),
        lambda: (torch.randint(0, cfg.vocab_size, (2, 16), dtype=torch.int64),),
        ("input_ids",),
        ("logits",),
    )


def hf_vit_tiny(seed: int = 0, attn_implementation: str = "sdpa") -> Example:
    """``ViTModel``: 32x32 image, 8x8 patches, hidden 64, 2 layers, 4 heads, intermediate 128.

    Input ``pixel_values (2, 3, 32, 32)``; outputs ``last_hidden_state (2, 17, 64)`` and
    ``pooler_output (2, 64)``.
    """
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        attn_implementation=attn_implementation,
    )
    return _build(
        seed,
        lambda: ViTModel(cfg),
        lambda: (torch.randn(2, 3, 32, 32),),
        ("pixel_values",),
        ("last_hidden_state", "pooler_output"),
    )


def pretrained_tiny(family: str, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The ``transformers`` model itself (no :class:`TensorOutputs` wrapper), as a user holds it.

    ``family`` is ``llama`` (GQA: 4 heads, 2 kv heads), ``qwen2`` (GQA, q/k/v biases),
    ``gpt2`` (tied lm_head, fused ``c_attn``), ``bert``, ``vit``, ``t5`` (``T5EncoderModel``:
    ``d_kv`` 16, relative position bias shared by the layers) or ``whisper`` (``WhisperEncoder``:
    16 mel bins, two convolutions halving 64 frames to 32 positions, which its forward requires
    exactly); all hidden 64, 2 layers, 4 heads, intermediate 128, vocab 128. Returns ``(model in
    eval mode, (input_ids,), (pixel_values,) or (input_features,))`` with batch 2 and sequence
    16 (Whisper: 64 frames). ``use_cache`` keeps its default, so decoders can ``generate()``.
    """
    import transformers as tf

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128}  # fmt: skip
    decoder = {"vocab_size": 128, "max_position_embeddings": 64, "num_key_value_heads": 2, **small}
    makers: dict[str, Callable[[], nn.Module]] = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**decoder)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder)),
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=128,
                n_positions=64,
                n_embd=64,
                n_layer=2,
                n_head=4,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "bert": lambda: tf.BertModel(
            tf.BertConfig(vocab_size=128, max_position_embeddings=64, **small)
        ),
        "vit": lambda: tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small)),
        "t5": lambda: tf.T5EncoderModel(
            tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        ),
        "whisper": lambda: _whisper_encoder(small),
    }
    if family not in makers:
        raise ValueError(f"unknown family {family!r}: one of {sorted(makers)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = makers[family]().eval()
        if family == "vit":
            return model, (torch.randn(2, 3, 32, 32),)
        if family == "whisper":
            return model, (torch.randn(2, 16, 64),)
        return model, (torch.randint(0, 128, (2, 16), dtype=torch.int64),)


def _whisper_encoder(small: dict[str, int]) -> nn.Module:
    """``WhisperEncoder`` (the encoder half of ``WhisperModel``, a ``PreTrainedModel`` itself);
    special token ids inside the small vocabulary, which the config validates."""
    import transformers as tf
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = tf.WhisperConfig(
        vocab_size=128, d_model=small["hidden_size"], encoder_layers=small["num_hidden_layers"],
        encoder_attention_heads=small["num_attention_heads"],
        encoder_ffn_dim=small["intermediate_size"], decoder_layers=1, num_mel_bins=16,
        max_source_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=0,
    )  # fmt: skip
    return WhisperEncoder(cfg)
