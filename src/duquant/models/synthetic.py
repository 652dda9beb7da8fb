"""Make a randomly initialised policy's activations look like a trained one's: a few channels carry large values.

Trained Gemma / SigLIP models have "massive activations": a handful of channels, the same in every layer, whose
values are tens of times larger than the rest in the inputs of q/k/v, gate/up (through large RMSNorm / LayerNorm
gains) and of down_proj (through large gate*up products on a few hidden units), plus a huge residual value on
the first (BOS) token. Random weights have none of that, so a report on them would flatter plain RTN. We inject
them, seeded and function-aware:

- Norm gains: on `n_channels` fixed residual channels, the (1 + weight) gain of every input / post-attention
  RMSNorm (the adaRMS `dense` bias of pi0.5's expert, the LayerNorm weight of SigLIP) becomes `gain` (30 / 20 / 12),
  and the matching input columns of q/k/v and gate/up (fc1, for SigLIP) are divided by sqrt(gain), so the layer
  outputs grow by sqrt(gain) on those channels instead of gain.
- down_proj inputs: `n_channels` hidden units per MLP get their up_proj row multiplied by `hidden_gain` (20) and
  their down_proj column divided by it: the layer function is unchanged, the activation has outliers.
- BOS: the embedding of token 2 gets a large value on the first outlier channel.
"""

from __future__ import annotations

import torch
from torch import nn


def _channels(width: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(width, generator=generator)[:n].sort().values


@torch.no_grad()
def add_massive_activations(model: nn.Module, seed: int = 0, n_channels: int = 3, llm_gain: float = 30.0,
                            expert_gain: float = 20.0, vision_gain: float = 12.0, hidden_gain: float = 20.0) -> None:
    g = torch.Generator().manual_seed(10_000 + seed)
    pwe = model.paligemma_with_expert
    lm = pwe.paligemma.model.language_model
    expert = pwe.gemma_expert.model

    for stack, gain in ((lm, llm_gain), (expert, expert_gain)):
        ch = _channels(stack.cfg.width, n_channels, g)
        for layer in stack.layers:
            for norm, consumers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                             layer.self_attn.v_proj)),
                                    (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                if hasattr(norm, "weight"):
                    norm.weight[ch] = gain - 1.0  # Gemma's gain is (1 + weight)
                else:  # adaRMS: (1 + scale) with scale = dense(cond)[:D]; its bias sets the baseline
                    norm.dense.bias[ch] = gain - 1.0
                for lin in consumers:
                    lin.weight[:, ch] /= gain**0.5
            hidden = _channels(layer.mlp.up_proj.out_features, n_channels, g)
            layer.mlp.up_proj.weight[hidden] *= hidden_gain
            layer.mlp.down_proj.weight[:, hidden] /= hidden_gain
        if stack is lm:
            bos = 2 if lm.embed_tokens.num_embeddings > 2 else 0
            lm.embed_tokens.weight[bos, ch[0]] = 40.0 * lm.embed_tokens.weight.std()

    vision = pwe.paligemma.model.vision_tower.vision_model
    ch = _channels(vision.post_layernorm.normalized_shape[0], n_channels, g)
    for layer in vision.encoder.layers:
        for norm, consumers in ((layer.layer_norm1, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                     layer.self_attn.v_proj)),
                                (layer.layer_norm2, (layer.mlp.fc1,))):
            norm.weight[ch] = vision_gain
            for lin in consumers:
                lin.weight[:, ch] /= vision_gain**0.5
