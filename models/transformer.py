"""Hand-written transformer models of the zoo: a ViT and a LLaMA-style decoder.

Written with plain torch ops so the captured graph shows the attention idioms a head-pruning
pass has to see through:

* ``Attention``: one fused ``qkv`` Linear, ``reshape(B, N, 3, H, D)`` + ``permute`` + ``unbind``,
  explicit ``softmax(q @ k^T * scale) @ v``; the heads x head_dim factorisation of the Linear
  output is the coupling to recover.
* ``SDPAAttention``: separate q/k/v Linears and ``F.scaled_dot_product_attention``.
* ``Decoder``: token ``Embedding``, hand-written RMSNorm, rotary embedding (``rotate_half``: a
  split and ``cat`` along head_dim), grouped-query attention with ``repeat_interleave`` of the
  kv heads, a causal SDPA, SwiGLU MLP and an optionally tied ``lm_head``.
* The ViT's class token is ``cat``-ed on the sequence axis and read back with ``x[:, 0]``.

Factories return ``(model, example_inputs)`` in eval mode, built under ``seed`` without touching
the global RNG; inputs have batch 2 so ``torch.export`` does not specialise the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Decoder",
    "RMSNorm",
    "SDPAAttention",
    "ViT",
    "llama_tiny",
    "llama_tiny_tied",
    "vit_tiny",
    "vit_tiny_sdpa",
]

Example = tuple[nn.Module, tuple[Tensor, ...]]


def _build(seed: int, make: Callable[[], nn.Module], make_input: Callable[[], Tensor]) -> Example:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        x = make_input()
    return model.eval(), (x,)


# -------------------------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection, written out by hand."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class SDPAAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and fused SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            lin(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for lin in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attention: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021).

    Parameters
    ----------
    image_size, patch_size : int
        Square input side and patch side (a stride-``patch_size`` conv embeds patches).
    dim, depth, num_heads, mlp_dim : int
        Width, blocks, heads and MLP hidden width.
    num_classes : int
        Classifier outputs, read from the class token.
    attention : {"fused", "sdpa"}
        ``Attention`` (fused qkv, explicit softmax) or ``SDPAAttention``.

    Examples
    --------
    >>> model = ViT(32, 8, dim=32, depth=1, num_heads=4, mlp_dim=64).eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 8,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_dim: int = 128,
        num_classes: int = 10,
        attention: str = "fused",
    ) -> None:
        super().__init__()
        attn_cls = {"fused": Attention, "sdpa": SDPAAttention}[attention]
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(
            *(Block(dim, num_heads, mlp_dim, attn_cls) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(seed: int = 0, num_classes: int = 10) -> Example:
    """Fused-qkv ViT: 32x32 image, 8x8 patches (17 tokens), dim 64, 2 blocks, 4 heads."""
    return _build(
        seed,
        lambda: ViT(32, 8, 64, 2, 4, 128, num_classes, attention="fused"),
        lambda: torch.randn(2, 3, 32, 32),
    )


def vit_tiny_sdpa(seed: int = 0, num_classes: int = 10) -> Example:
    """As ``vit_tiny`` with separate q/k/v Linears and ``scaled_dot_product_attention``."""
    return _build(
        seed,
        lambda: ViT(32, 8, 64, 2, 4, 128, num_classes, attention="sdpa"),
        lambda: torch.randn(2, 3, 32, 32),
    )


# -------------------------------------------------------------------------------------- Decoder


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis (GPT-NeoX / LLaMA layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embedding (Su et al. 2021) for ``seq_len`` positions."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class GQAttention(nn.Module):
    """Causal grouped-query attention: ``n_heads`` query heads share ``n_kv_heads`` kv heads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Query head h reads kv head h // n_rep: a Repeat coupling, not an Identity one.
        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(dim)
        self.attn = GQAttention(dim, n_heads, n_kv_heads, head_dim)
        self.post_attn_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class Decoder(nn.Module):
    """LLaMA-style causal language model returning logits ``(B, T, vocab_size)``.

    Parameters
    ----------
    vocab_size, dim, depth : int
        Vocabulary, width (``n_heads * head_dim`` need not equal it) and layers.
    n_heads, n_kv_heads, head_dim : int
        Query heads, shared kv heads and per-head width.
    hidden : int
        SwiGLU hidden width.
    tie_embeddings : bool
        Share one weight between the token embedding and ``lm_head``.

    Examples
    --------
    >>> model = Decoder(vocab_size=64, dim=32, depth=1).eval()
    >>> model(torch.zeros(2, 8, dtype=torch.int64)).shape
    torch.Size([2, 8, 64])
    """

    def __init__(
        self,
        vocab_size: int = 128,
        dim: int = 32,
        depth: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        head_dim: int = 8,
        hidden: int = 64,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.rotary = RotaryEmbedding(head_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim, n_heads, n_kv_heads, head_dim, hidden) for _ in range(depth)
        )
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for m in self.modules():
            if isinstance(m, RMSNorm):
                # Non-unit norm weights so a pruned channel's scale is visible in oracle tests.
                nn.init.uniform_(m.weight, 0.5, 1.5)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def llama_tiny(seed: int = 0, tie_embeddings: bool = False) -> Example:
    """Decoder: vocab 128, dim 32, 2 layers, 4 query / 2 kv heads of 8, input ids ``(2, 16)``."""
    return _build(
        seed,
        lambda: Decoder(128, 32, 2, 4, 2, 8, 64, tie_embeddings=tie_embeddings),
        lambda: torch.randint(0, 128, (2, 16), dtype=torch.int64),
    )


def llama_tiny_tied(seed: int = 0) -> Example:
    """``llama_tiny`` with ``lm_head.weight`` tied to the token embedding."""
    return llama_tiny(seed, tie_embeddings=True)
