"""Gemma decoder (PaliGemma's language model and the pi0 action expert), with openpi's module names.

RMSNorm scales by (1 + weight); the pi0.5 expert replaces it by adaptive RMSNorm (`dense`: cond -> scale, shift,
gate) with gated residuals. Attention has one KV head, RoPE, and can attend to a cached prefix: that is how the
action expert reads the language model's keys and values (openpi's joint attention at inference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duquant.models.config import GemmaConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, kv_heads, S, head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)  # adaRMS (pi0.5): scale, shift, gate from the time embedding

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if not hasattr(self, "dense"):
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs the time conditioning")
        scale, shift, gate = self.dense(cond).float()[:, None, :].chunk(3, dim=-1)  # (B, 1, D) each
        return (normed * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, T, S) -> additive (B, 1, T, S); a large negative instead of -inf keeps fully masked rows finite."""
    return torch.where(mask[:, None], 0.0, torch.finfo(dtype).min).to(dtype)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                prefix_kv: KV | None = None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv = (k, v)
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype),
                                           scale=1.0 / math.sqrt(c.head_dim))
        y = y.transpose(1, 2).reshape(B, T, c.num_heads * c.head_dim)
        return self.o_proj(y), kv


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.rms_eps, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_eps, cond_dim)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, cos, sin, mask, prefix_kv: KV | None = None, cond: torch.Tensor | None = None):
        h, gate = self.input_layernorm(x, cond)
        h, kv = self.self_attn(h, cos, sin, mask, prefix_kv)
        x = gated_residual(x, h, gate)
        h, gate = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h), gate), kv


class GemmaModel(nn.Module):
    """`embed_tokens` only for the language model (openpi drops the expert's)."""

    def __init__(self, cfg: GemmaConfig, with_embeddings: bool = True, cond_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        if with_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.rms_eps, cond_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                prefix_kvs: list[KV] | None = None, cond: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[KV]]:
        """x (B, T, width) already embedded (openpi scales token embeddings by sqrt(width) itself);
        mask bool (B, T, S) over [prefix..., own tokens]; returns the normed output and per-layer (k, v)."""
        cos, sin = rope(positions, self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if prefix_kvs is None else prefix_kvs[i], cond)
            kvs.append(kv)
        return self.norm(x, cond)[0], kvs


class GemmaForCausalLM(nn.Module):
    """The action expert's container (`gemma_expert.model`, `gemma_expert.lm_head`; the head is unused)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.model = GemmaModel(cfg, with_embeddings=False, cond_dim=cond_dim)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
