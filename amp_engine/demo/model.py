"""A small GPT-style character-level transformer: where mixed precision matters.

Pre-LayerNorm blocks (causal self-attention + GELU MLP), learned position
embeddings, an untied output head. Every matmul runs under autocast in the AMP
run, while LayerNorm, softmax and the loss stay fp32 (autocast's own lists), so
the model is a fair, ordinary example of what users train.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    context: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0  # off: keeps the fp32 and AMP runs on identical randomness
    # "sdpa" (torch's fused kernel), "explicit" (matmul, mask, softmax, matmul) or "auto":
    # sdpa on CUDA, explicit on the CPU, where torch's fused CPU kernel runs its backward
    # far slower in bf16 than in fp32 (fwd+bwd for the demo's shape, 1 thread, torch 2.14:
    # sdpa 19 ms fp32 / 50 ms bf16; explicit 23 ms fp32 / 14 ms bf16). Both runs of a demo
    # use the same model code, so the comparison stays like for like.
    attention: str = "auto"


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        if shape.d_model % shape.n_heads:
            raise ValueError(f"d_model={shape.d_model} must be divisible by n_heads={shape.n_heads}")
        if shape.attention not in ("auto", "sdpa", "explicit"):
            raise ValueError(f"attention={shape.attention!r}; allowed: 'auto', 'sdpa', 'explicit'")
        self.n_heads = shape.n_heads
        self.attention = shape.attention
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.proj = nn.Linear(shape.d_model, shape.d_model)
        self.dropout = shape.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, heads, T, D/heads)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        kind = self.attention if self.attention != "auto" else ("sdpa" if x.is_cuda else "explicit")
        if kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # under autocast the two matmuls run in low precision, softmax in fp32 (autocast's lists)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            att = F.dropout(att, self.dropout, self.training)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.ln2 = nn.LayerNorm(shape.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(shape.d_model, 4 * shape.d_model),
            nn.GELU(),
            nn.Linear(4 * shape.d_model, shape.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Next-character model.

    forward(idx): idx (B, T) int64 character ids, T <= context, any device ->
    logits (B*T, vocab_size), flattened so that a trainer sees an ordinary
    classification problem (targets (B*T,)): loss and accuracy need no reshaping.
    """

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.context, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layers))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # GPT-2's init: small normal weights keep the first losses near log(vocab).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        if t > self.shape.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.shape.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).reshape(b * t, -1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
