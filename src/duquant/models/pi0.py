"""pi0 / pi0.5 flow-matching policy in plain PyTorch, with openpi's PyTorch module names and checkpoint keys.

References (openpi @ 15a9616): `src/openpi/models_pytorch/pi0_pytorch.py` (PI0Pytorch), `gemma_pytorch.py`
(PaliGemmaWithExpertModel), the transformers files it patches, and the JAX `models/pi0.py` they port.

Inference, as openpi runs it (`sample_actions`):
  1. prefix = [SigLIP tokens of each camera, projected to the LM width] + [language tokens * sqrt(width)]; all of
     it one bidirectional block (padding and masked cameras excluded);
  2. one language-model forward over the prefix, keeping every layer's keys (after RoPE) and values;
  3. `num_steps` Euler steps from t = 1 (noise) to t = 0 (actions), dt = -1/num_steps: the action expert runs on
     the suffix (pi0: [state token] + [action tokens], the time mixed into each action token by an MLP;
     pi0.5: [action tokens], the time entering every norm through adaRMS) and attends to the cached prefix.
Block attention (openpi's `make_att_2d_masks`): images + language one block; pi0's state token a block of its own;
the action tokens one block that sees everything before it and attends bidirectionally within itself.
Positions (RoPE) count only real tokens: cumsum(pad) - 1, the suffix continuing after the prefix's real tokens.

`PaliGemmaWithExpertModel.forward` also has openpi's joint path (prefix and suffix in one pass, per-layer
concatenation of both streams' Q/K/V, each stream with its own weights); `velocity` and `forward` (the training
loss) use it; tests check that it equals the cached path. Nothing here imports duquant's quantization code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duquant.models.config import PolicyConfig
from duquant.models.gemma import KV, GemmaForCausalLM, GemmaModel, apply_rope, attend, mask_bias, rope_cos_sin
from duquant.models.observation import Observation, preprocess_observation
from duquant.models.siglip import SiglipVisionModel


def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    """big_vision's block rule: token i attends to j iff cumsum(att)[j] <= cumsum(att)[i] and both are real.
    pad_masks bool (B, N): real token; att_masks (B, N): 1 where a new block starts, 0 where the previous goes on.
    Returns bool (B, N, N)."""
    cumsum = torch.cumsum(att_masks.long(), dim=1)
    att_2d = cumsum[:, None, :] <= cumsum[:, :, None]
    return att_2d & (pad_masks[:, None, :] & pad_masks[:, :, None])


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0
                              ) -> torch.Tensor:
    """openpi's `create_sinusoidal_pos_embedding`: t (B,) -> (B, dim) = [sin, cos], computed in float64 and
    returned in t's dtype."""
    if dim % 2:
        raise ValueError(f"time embedding width {dim} must be even")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]  # (B, dim/2), float64
    return torch.cat([angle.sin(), angle.cos()], dim=1).to(t.dtype)


def euler_times(num_steps: int) -> list[float]:
    """The times openpi's loop visits: t = 1, then t += dt in float32 while t >= -dt/2 (dt = -1/num_steps)."""
    dt = np.float32(-1.0 / num_steps)
    t, times = np.float32(1.0), []
    while t >= -dt / np.float32(2):
        times.append(float(t))
        t = np.float32(t + dt)
    return times


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """A Linear's weight dtype (it may have been replaced by a quantized layer without `.weight`)."""
    w = getattr(module, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else default


class MultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # openpi's port does not divide image features by sqrt(width)


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
        """(B, 3, H, W) in [-1, 1] -> (B, num_patches, llm width)."""
        pg = self.paligemma.model
        return pg.multi_modal_projector(pg.vision_tower(pixels))

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.paligemma.model.language_model.embed_tokens(tokens)

    def forward(self, inputs_embeds: list[torch.Tensor | None], positions: torch.Tensor, mask: torch.Tensor,
                past_kvs: list[KV] | None = None, adarms_cond: list[torch.Tensor | None] | None = None
                ) -> tuple[list[torch.Tensor | None], list[KV] | None]:
        """openpi's three cases. [prefix, None]: the language model alone, returning each layer's (k, v);
        [None, suffix]: the expert alone on top of `past_kvs`; [prefix, suffix]: both in one pass, where each
        layer concatenates the two streams' Q/K/V along the sequence, attends once under `mask` (B, T, T), and
        splits the result back (each stream has its own norms, projections and MLP)."""
        conds = adarms_cond or [None, None]
        lm, expert = self.paligemma.model.language_model, self.gemma_expert.model
        prefix, suffix = inputs_embeds
        if suffix is None:
            out, kvs = lm(prefix, positions, mask, cond=conds[0])
            return [out, None], kvs
        if prefix is None:
            out, _ = expert(suffix, positions, mask, past_kvs, cond=conds[1])
            return [None, out], None

        xs, models = [prefix, suffix], [lm, expert]
        cos, sin = rope_cos_sin(positions, lm.cfg.head_dim, lm.cfg.rope_theta, prefix.dtype)
        bias = mask_bias(mask, prefix.dtype)
        for i in range(lm.cfg.depth):
            layers = [m.layers[i] for m in models]
            normed = [layer.input_layernorm(x, c) for layer, x, c in zip(layers, xs, conds)]  # (h, gate) each
            qkvs = [layer.self_attn.project_qkv(h) for layer, (h, _) in zip(layers, normed)]
            q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkvs))  # (B, H or KV, T_prefix + T_suffix, hd)
            gates = [gate for _, gate in normed]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = attend(q, k, v.to(q.dtype), bias)  # (B, T, H * hd)
            ys = y.split([x.shape[1] for x in xs], dim=1)
            xs = [layer.finish(x, yi, gate, c) for layer, x, yi, gate, c in zip(layers, xs, ys, gates, conds)]
        return [m.norm(x, c)[0] for m, x, c in zip(models, xs, conds)], None


class PI0Policy(nn.Module):
    """openpi's PI0Pytorch; `config.pi05` selects pi0.5 (adaRMS time conditioning, no state token)."""

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
    def _embed_weight(self) -> torch.Tensor:
        return self.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The transformer stream's dtype (the token embedding's)."""
        return self._embed_weight.dtype

    @property
    def device(self) -> torch.device:
        return self._embed_weight.device

    # ---- prefix: images + language -----------------------------------------------------------------------------
    def embed_prefix(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> embeddings (B, P, llm width), pad mask bool (B, P), block starts bool (B, P) (all False: one block).
        Cameras in `config.image_keys` that the observation lacks are left out, which is equivalent to openpi's
        zero image with mask False (a masked token neither is attended to nor advances the positions)."""
        B = obs.batch_size
        keys = [k for k in self.config.image_keys if k in obs.images]
        embs, pads = [], []
        if keys:
            pixels = torch.cat([obs.images[k] for k in keys])  # (n_cams * B, 3, H, W): one vision pass
            img = self.paligemma_with_expert.embed_image(pixels).to(self.dtype)  # (n_cams * B, N, W)
            for key, emb in zip(keys, img.split(B)):
                mask = obs.image_masks.get(key)
                mask = torch.ones(B, dtype=torch.bool, device=emb.device) if mask is None else mask.to(emb.device)
                embs.append(emb)
                pads.append(mask[:, None].expand(B, emb.shape[1]))
        lang = self.paligemma_with_expert.embed_language_tokens(obs.tokenized_prompt)  # (B, L, W)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(obs.tokenized_prompt_mask.bool())
        embs_t = torch.cat(embs, dim=1)
        att = torch.zeros(embs_t.shape[:2], dtype=torch.bool, device=embs_t.device)
        return embs_t, torch.cat(pads, dim=1), att

    # ---- suffix: (state) + noisy actions + time ----------------------------------------------------------------
    def embed_suffix(self, state: torch.Tensor, noisy_actions: torch.Tensor, timestep: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> embeddings (B, S, expert width) with S = [1 +] action_horizon, pad (B, S), block starts (B, S),
        adaRMS conditioning (B, expert width) for pi0.5 (None for pi0)."""
        B, H, _ = noisy_actions.shape
        head = _dtype_of(self.action_in_proj, torch.float32)
        embs = []
        if not self.pi05:
            embs.append(self.state_proj(state.to(_dtype_of(self.state_proj, head)))[:, None])  # (B, 1, w)
        time_emb = sinusoidal_time_embedding(timestep.float(), self.action_in_proj.out_features).to(head)  # (B, w)
        action_emb = self.action_in_proj(noisy_actions.to(head))  # (B, H, w)
        if self.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            embs.append(action_emb)
        else:
            x = torch.cat([action_emb, time_emb[:, None].expand_as(action_emb)], dim=-1)  # (B, H, 2w)
            embs.append(self.action_time_mlp_out(F.silu(self.action_time_mlp_in(x))))
            cond = None
        embs_t = torch.cat(embs, dim=1).to(self.dtype)
        S = embs_t.shape[1]
        pad = torch.ones(B, S, dtype=torch.bool, device=embs_t.device)
        att = torch.zeros(B, S, dtype=torch.bool, device=embs_t.device)
        att[:, 0] = True  # pi0: the state token starts a block (pi0.5: the first action token does)
        att[:, S - H] = True  # the action tokens start a block
        return embs_t, pad, att, cond

    def _actions_out(self, suffix_out: torch.Tensor) -> torch.Tensor:
        out = suffix_out[:, -self.config.action_horizon:].float()
        return self.action_out_proj(out.to(_dtype_of(self.action_out_proj, torch.float32))).float()

    # ---- inference ---------------------------------------------------------------------------------------------
    def prefix_forward(self, obs: Observation) -> tuple[list[KV], torch.Tensor]:
        """One language-model pass over the prefix: every layer's (k, v) (B, 1, P, hd) and the pad mask (B, P)."""
        embs, pad, att = self.embed_prefix(obs)
        positions = torch.cumsum(pad.long(), dim=1) - 1
        _, kvs = self.paligemma_with_expert([embs, None], positions, make_att_2d_masks(pad, att))
        return kvs, pad

    def denoise_step(self, state: torch.Tensor, prefix_pad: torch.Tensor, past_kvs: list[KV], x_t: torch.Tensor,
                     timestep: torch.Tensor) -> torch.Tensor:
        """Velocity v(x_t, t) (B, horizon, action_dim) float32, from the expert on the cached prefix.
        Device ops only (no host syncs), so it can be compiled or captured in a CUDA graph."""
        embs, pad, att, cond = self.embed_suffix(state, x_t, timestep)
        B, S = pad.shape
        prefix_part = prefix_pad[:, None, :].expand(B, S, prefix_pad.shape[1])  # the suffix sees the real prefix
        mask = torch.cat([prefix_part, make_att_2d_masks(pad, att)], dim=2)  # (B, S, P + S)
        positions = prefix_pad.long().sum(-1, keepdim=True) + torch.cumsum(pad.long(), dim=1) - 1
        (_, out), _ = self.paligemma_with_expert([None, embs], positions, mask, past_kvs, [None, cond])
        return self._actions_out(out)

    def velocity(self, obs: Observation, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The same velocity as `denoise_step`, from one joint prefix + suffix pass without a cache (openpi's
        training path)."""
        p_embs, p_pad, p_att = self.embed_prefix(obs)
        s_embs, s_pad, s_att, cond = self.embed_suffix(obs.state, x_t, timestep)
        pad, att = torch.cat([p_pad, s_pad], dim=1), torch.cat([p_att, s_att], dim=1)
        positions = torch.cumsum(pad.long(), dim=1) - 1
        (_, out), _ = self.paligemma_with_expert([p_embs, s_embs], positions, make_att_2d_masks(pad, att),
                                                 adarms_cond=[None, cond])
        return self._actions_out(out)

    def forward(self, obs: Observation, actions: torch.Tensor, noise: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> torch.Tensor:
        """openpi's training objective: per-element squared error (B, horizon, action_dim) between the predicted
        velocity at x_t = t * noise + (1 - t) * actions and u_t = noise - actions; t ~ 0.001 + 0.999 Beta(1.5, 1)."""
        obs = preprocess_observation(obs, self.config.image_keys, self.config.vision.image_size)
        actions = actions.float()
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
            time = (beta.sample((actions.shape[0],)) * 0.999 + 0.001).to(actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        return F.mse_loss(noise - actions, self.velocity(obs, x_t, time.float()), reduction="none")

    @torch.no_grad()
    def sample_actions(self, observation: Observation, noise: torch.Tensor | None = None,
                       num_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, action_horizon, action_dim) float32 actions (in the model's normalized space). Pass `noise`
        (B, horizon, action_dim) or a seeded `generator` for deterministic results."""
        num_steps = num_steps or self.config.num_steps
        B, device = observation.batch_size, self.device
        expected = (B, self.config.action_horizon, self.config.action_dim)
        if noise is None:  # drawn where the generator lives (the model's device without one)
            noise = torch.randn(expected, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else device)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected}")
        # With inputs already on the model's device, everything below is device work: no host->device copy, no
        # device->host sync, so a CUDA graph can capture the whole call (duquant.runtime.CapturedPolicy).
        obs = preprocess_observation(observation.to(device), self.config.image_keys, self.config.vision.image_size)
        past_kvs, prefix_pad = self.prefix_forward(obs)
        x_t = noise.to(device=device, dtype=torch.float32)
        dt = float(np.float32(-1.0 / num_steps))
        for t in euler_times(num_steps):  # the times are host constants: each becomes a fill, not a copy
            timestep = torch.full((B,), t, dtype=torch.float32, device=device)
            x_t = x_t + dt * self.denoise_step(obs.state, prefix_pad, past_kvs, x_t, timestep)
        return x_t
