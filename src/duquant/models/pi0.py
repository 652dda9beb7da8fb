"""pi0 / pi0.5 flow-matching policy in plain PyTorch, with openpi's PyTorch module names and checkpoint keys.

References: openpi `src/openpi/models_pytorch/pi0_pytorch.py` (PI0Pytorch), `gemma_pytorch.py`
(PaliGemmaWithExpertModel) and the JAX `pi0.py` they port. Inference, as openpi runs it:
  1. prefix = [SigLIP tokens of each camera] + [language tokens * sqrt(width)]; one bidirectional block;
  2. one forward of the language model over the prefix, keeping every layer's keys and values;
  3. `num_steps` Euler steps (t: 1 -> 0, dt = -1/num_steps) of the action expert over the suffix
     (pi0: [state token] + [action tokens]; pi0.5: [action tokens], time enters through adaRMS), which attends to
     the cached prefix and, within the action block, bidirectionally.
This file does not import anything from duquant's quantization code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duquant.models.config import PolicyConfig
from duquant.models.gemma import KV, GemmaForCausalLM, GemmaModel
from duquant.models.observation import Observation
from duquant.models.siglip import SiglipVisionModel


def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    """openpi's block-causal rule: token i attends to j iff cumsum(att)[j] <= cumsum(att)[i] and both are real.
    att_masks marks where a new block starts (1) or the previous continues (0)."""
    cumsum = torch.cumsum(att_masks.long(), dim=1)
    att_2d = cumsum[:, None, :] <= cumsum[:, :, None]
    return att_2d & (pad_masks[:, None, :] & pad_masks[:, :, None])


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0
                              ) -> torch.Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


class MultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemmaModel(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.vision_tower = SiglipVisionModel(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg.vision.width, cfg.llm.width)
        self.language_model = GemmaModel(cfg.llm, with_embeddings=True)


class PaliGemmaForConditionalGeneration(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.model = PaliGemmaModel(cfg)
        self.lm_head = nn.Linear(cfg.llm.width, cfg.llm.vocab_size, bias=False)
        self.lm_head.weight = self.model.language_model.embed_tokens.weight  # tied, as in PaliGemma


class PaliGemmaWithExpertModel(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(cfg)
        self.gemma_expert = GemmaForCausalLM(cfg.expert, cond_dim=cfg.expert.width if cfg.pi05 else None)

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.paligemma.model.multi_modal_projector(self.paligemma.model.vision_tower(pixels))

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.paligemma.model.language_model.embed_tokens(tokens)


class PI0Policy(nn.Module):
    """openpi's PI0Pytorch: `config.pi05` selects pi0.5 (adaRMS time conditioning, no state token)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.pi05 = config.pi05
        w = config.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpertModel(config)
        self.action_in_proj = nn.Linear(config.action_dim, w)
        self.action_out_proj = nn.Linear(w, config.action_dim)
        if config.pi05:
            self.time_mlp_in = nn.Linear(w, w)
            self.time_mlp_out = nn.Linear(w, w)
        else:
            self.state_proj = nn.Linear(config.action_dim, w)
            self.action_time_mlp_in = nn.Linear(2 * w, w)
            self.action_time_mlp_out = nn.Linear(w, w)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    # ---- prefix: images + language -----------------------------------------------------------------------------
    def embed_prefix(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embs, pads = [], []
        for key in self.config.image_keys:
            if key not in obs.images:
                continue
            img = self.paligemma_with_expert.embed_image(obs.images[key].to(self.dtype))  # (B, 256, W)
            B, n = img.shape[:2]
            embs.append(img)
            pads.append(obs.image_masks[key][:, None].expand(B, n))
        lang = self.paligemma_with_expert.embed_language_tokens(obs.tokenized_prompt)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(obs.tokenized_prompt_mask)
        embs_t = torch.cat(embs, dim=1)
        # images + language form one bidirectional block (no new block starts inside the prefix)
        att = torch.zeros(embs_t.shape[:2], dtype=torch.bool, device=embs_t.device)
        return embs_t, torch.cat(pads, dim=1), att

    # ---- suffix: (state) + noisy actions + time ----------------------------------------------------------------------
    def embed_suffix(self, state: torch.Tensor, noisy_actions: torch.Tensor, t: torch.Tensor):
        B, H, _ = noisy_actions.shape
        w = self.config.expert.width
        embs = []
        if not self.pi05:
            embs.append(self.state_proj(state.to(self.dtype))[:, None])  # (B, 1, w)
        time_emb = sinusoidal_time_embedding(t, w).to(self.dtype)  # (B, w)
        action_emb = self.action_in_proj(noisy_actions.to(self.dtype))  # (B, H, w)
        if self.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            embs.append(action_emb)
        else:
            x = torch.cat([action_emb, time_emb[:, None].expand(B, H, w)], dim=-1)
            embs.append(self.action_time_mlp_out(F.silu(self.action_time_mlp_in(x))))
            cond = None
        embs_t = torch.cat(embs, dim=1)
        pad = torch.ones(B, embs_t.shape[1], dtype=torch.bool, device=embs_t.device)
        # pi0: the state token is a block of its own; the action tokens start one more block (device ops only,
        # so the step can be captured in a CUDA graph)
        att = torch.zeros(B, embs_t.shape[1], dtype=torch.bool, device=embs_t.device)
        att[:, 0] = True
        att[:, -H] = True
        return embs_t, pad, att, cond

    # ---- inference ---------------------------------------------------------------------------------------------------
    def prefix_forward(self, obs: Observation) -> tuple[list[KV], torch.Tensor]:
        """One language-model pass over the prefix; returns every layer's (k, v) and the prefix pad mask."""
        embs, pad, att = self.embed_prefix(obs)
        mask = make_att_2d_masks(pad, att)
        positions = torch.cumsum(pad.long(), dim=1) - 1
        _, kvs = self.paligemma_with_expert.paligemma.model.language_model(embs, positions, mask)
        return kvs, pad

    def denoise_step(self, state: torch.Tensor, prefix_kvs: list[KV], prefix_pad: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Velocity v(x_t, t) from the action expert attending to the cached prefix. No host syncs."""
        embs, pad, att, cond = self.embed_suffix(state, x_t, t)
        B, S = pad.shape
        prefix_part = prefix_pad[:, None, :].expand(B, S, prefix_pad.shape[1])
        mask = torch.cat([prefix_part, make_att_2d_masks(pad, att)], dim=2)
        positions = prefix_pad.long().sum(-1, keepdim=True) + torch.cumsum(pad.long(), dim=1) - 1
        out, _ = self.paligemma_with_expert.gemma_expert.model(embs, positions, mask, prefix_kvs, cond)
        return self.action_out_proj(out[:, -self.config.action_horizon:]).float()

    @torch.no_grad()
    def sample_actions(self, obs: Observation, noise: torch.Tensor | None = None, num_steps: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, action_horizon, action_dim) actions; pass `noise` to make the result deterministic."""
        num_steps = num_steps or self.config.num_steps
        B = obs.batch_size
        device = self.action_in_proj.weight.device
        if noise is None:
            noise = torch.randn(B, self.config.action_horizon, self.config.action_dim, generator=generator)
        expected = (B, self.config.action_horizon, self.config.action_dim)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected}")
        obs = obs.to(device)
        prefix_kvs, prefix_pad = self.prefix_forward(obs)
        x_t = noise.to(device=device, dtype=torch.float32)
        dt = -1.0 / num_steps
        for step in range(num_steps):
            t = torch.full((B,), 1.0 + step * dt, device=device)
            x_t = x_t + dt * self.denoise_step(obs.state, prefix_kvs, prefix_pad, x_t, t)
        return x_t
