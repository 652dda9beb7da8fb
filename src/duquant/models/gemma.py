"""Gemma decoder (PaliGemma's language model and the pi0 action expert) with openpi's module names.

Follows openpi's patched transformers Gemma (`models_pytorch/transformers_replace/models/gemma/modeling_gemma.py`):
- RMSNorm computes in float32 and scales by (1 + weight); the pi0.5 expert replaces it by adaptive RMSNorm: a
  `dense` Linear maps the time conditioning to (scale, shift, gate), the norm gives `x_n * (1 + scale) + shift`,
  and the residual is gated: `x + gate * y` (`_gated_residual`). Norms return the stream's dtype.
- GeGLU MLP with tanh-approximated GELU; attention with one KV head shared by all query heads, RoPE
  (rotate-half convention, theta 1e4) applied in the stream's dtype, scale head_dim ** -0.5.
- No sqrt(width) scaling inside the model (openpi comments it out; the policy scales language embeddings itself).
Attention is openpi's eager formulation (scores, additive mask with openpi's -2.3819763e38 for "masked" so a fully
masked row stays finite, float32 softmax), grouped so the one KV head is never copied per query head. The joint
prefix + suffix forward lives in `pi0.py`, which calls the per-layer pieces below (`project_qkv`, `attend`,
`finish`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duquant.models.config import GemmaConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, num_kv_heads, S, head_dim), k after RoPE
MASKED = -2.3819763e38  # openpi `_prepare_attention_masks_4d`


class RMSNorm(nn.Module):
    """Gemma RMSNorm, or (cond_dim given) pi0.5's adaptive RMSNorm. Returns (normed, gate or None)."""

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)  # cond -> (scale, shift, gate)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        var = x.float().pow(2).mean(-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)  # float32
        if not hasattr(self, "dense"):
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm (pi0.5 expert) needs the time conditioning `cond`")
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # (B, 1, D) each
        return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, head_dim) for integer positions (B, T): computed in float32, returned in `dtype`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, T, S), True = may attend -> additive (B, 1, T, S)."""
    return torch.where(mask[:, None], 0.0, MASKED).to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, KV, S, hd), bias (B, 1, T, S) -> (B, T, H * hd).

    Grouped-query attention as openpi's eager Gemma computes it (scores in the stream's dtype, softmax in float32),
    with each KV head's query heads stacked along the query axis: one batched GEMM per product and no copy of the
    shared keys and values (Gemma's one KV head is read once for all 8 query heads)."""
    B, H, T, hd = q.shape
    KVh, S = k.shape[1], k.shape[2]
    pad = -S % 8  # keys padded to a multiple of 8, masked: odd lengths (816 + 51) push cuBLAS onto align-1 kernels
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        bias = F.pad(bias, (0, pad), value=MASKED)
        S += pad
    qg = q.reshape(B, KVh, (H // KVh) * T, hd)  # heads of a group are consecutive: (B, KV, G*T, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * hd ** -0.5  # (B, KV, G*T, S)
    scores = scores.view(B, H, T, S) + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    y = torch.matmul(probs.view(B, KVh, (H // KVh) * T, S), v)  # (B, KV, G*T, hd)
    return y.view(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)


def fused_linear(x: torch.Tensor, weight: torch.Tensor | None, parts: tuple[nn.Module, ...],
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The outputs of `parts` (Linears reading the same input): one GEMM on their concatenated weight when
    `runtime.fuse_projections` made one (and every part is still that plain Linear), else one call per part."""
    if weight is not None and all(type(p) is nn.Linear for p in parts):
        return F.linear(x, weight, bias).split([p.out_features for p in parts], dim=-1)
    return tuple(p(x) for p in parts)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        # [q; k; v] weights in one matrix, set by `duquant.runtime.fuse_projections` (not saved: the three Linears
        # keep openpi's names and views of it).
        self.register_buffer("qkv_weight", None, persistent=False)

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, width) -> q (B, H, T, hd), k and v (B, KV, T, hd), before RoPE."""
        B, T, _ = h.shape
        q, k, v = fused_linear(h, self.qkv_weight, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_kv: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Self-attention over [past_kv, own tokens]; returns the output and the own (k, v) (for a cache)."""
        q, k, v = self.project_qkv(h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)  # (B, KV, S_past + T, hd)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
        return self.o_proj(attend(q, k, v, bias)), own


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # see GemmaAttention.qkv_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, self.gate_up_weight, (self.gate_proj, self.up_proj))
        if getattr(self.down_proj, "fuses_gelu_tanh_mul", False):  # a quantized down projection whose activation
            return self.down_proj.forward_gelu_tanh_mul(gate, up)  # kernel computes the product itself
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.rms_eps, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_eps, cond_dim)
        self.mlp = GemmaMLP(cfg)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, gate: torch.Tensor | None,
               cond: torch.Tensor | None) -> torch.Tensor:
        """Everything after attention: o_proj, gated residual, post-attention norm, MLP, gated residual.
        attn_out (B, T, H * hd) is the attention output before o_proj."""
        x = gated_residual(x, self.self_attn.o_proj(attn_out.to(x.dtype)), gate)
        h, gate = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h), gate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_kv: KV | None = None, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        h, gate = self.input_layernorm(x, cond)
        h, kv = self.self_attn(h, cos, sin, bias, past_kv)
        x = gated_residual(x, h, gate)
        h, gate = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h), gate), kv


class GemmaModel(nn.Module):
    """Decoder stack. `embed_tokens` only for the language model (openpi sets the expert's to None)."""

    def __init__(self, cfg: GemmaConfig, with_embeddings: bool = True, cond_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        if with_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.rms_eps, cond_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                past_kvs: list[KV] | None = None, cond: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[KV]]:
        """x (B, T, width), already embedded; positions (B, T) int; mask bool (B, T, S) over
        [past tokens..., own tokens]; past_kvs per layer. Returns the final-normed output and each layer's own (k, v).
        """
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        bias = mask_bias(mask, x.dtype)
        kvs: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, bias, None if past_kvs is None else past_kvs[i], cond)
            kvs.append(kv)
        return self.norm(x, cond)[0], kvs


class GemmaForCausalLM(nn.Module):
    """The action expert's container (`gemma_expert.model`, `gemma_expert.lm_head`; the head is never used but is
    in openpi's checkpoints, so it is here)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.model = GemmaModel(cfg, with_embeddings=False, cond_dim=cond_dim)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
