"""SigLIP vision encoder (So400m/14 at full size) with the module names of transformers' SiglipVisionModel, which
openpi's PyTorch PaliGemma uses: `vision_tower.vision_model.{embeddings, encoder.layers.N, post_layernorm}`.

As in openpi's patched `modeling_siglip.py`: pre-LayerNorm blocks (eps 1e-6), multi-head attention with biases,
a tanh-GELU MLP (`fc1`, `fc2`), learned position embeddings, no pooling head (PaliGemma uses every patch token).
Pixels enter in the patch embedding's dtype; the encoder runs in its LayerNorms' dtype (openpi's bf16 recipe keeps
the patch and position embeddings in float32 and the rest in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duquant.models.config import SiglipConfig
from duquant.models.gemma import fused_linear


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, W, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W), row-major patches
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        # [q; k; v] in one matrix (and bias), set by `duquant.runtime.fuse_projections`; not saved.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = fused_linear(x, self.qkv_weight, (self.q_proj, self.k_proj, self.v_proj), self.qkv_bias)
        q, k, v = (t.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2) for t in qkv)  # (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # scale hd ** -0.5, no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels).to(self.post_layernorm.weight.dtype)
        return self.post_layernorm(self.encoder(x))


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> (B, num_patches, width)."""
        return self.vision_model(pixels)
