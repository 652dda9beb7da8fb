"""Make a randomly initialised policy's activations look like a trained one's: a few channels carry large values.

Trained Gemma and SigLIP models have outlier channels: the same few channels, in every layer, whose values in the
inputs of q/k/v and gate/up (SigLIP: q/k/v and fc1) are tens of times larger than the others (their norm gains are
large), a few MLP hidden units that dominate the inputs of down_proj, and "massive activations": a huge residual
value on one channel of the first (BOS) token, which the norms tame with a small gain on that channel. Random
weights have none of this, so a quantization report on them would flatter plain round-to-nearest. `add_outliers`
injects them, seeded and deterministic, in place (`build_policy` calls it for the `*-tiny` configs):

1. Outlier channels. Per tower (LM, expert, SigLIP) `n_channels` (3) fixed residual channels get a norm gain of
   `gain` (LM 40, expert 30, SigLIP 30) in every layer's two pre-norms: Gemma's (1 + weight) -> gain; pi0.5's
   adaRMS through the `dense` bias of its scale chunk (scale = gain - 1 at zero conditioning); SigLIP's LayerNorm
   weight -> gain. The matching input columns of the consumers (q/k/v, gate/up, fc1) are divided by sqrt(gain), so
   those channels still matter more than the rest (by sqrt(gain)) but the layers stay well scaled. The per-channel
   absmax of those Linear inputs is then >= 20x the median channel's (tests/test_models.py checks it).
2. down_proj / fc2 inputs: `n_channels` hidden units per MLP get their up_proj (fc1) row multiplied by
   `hidden_gain` (20) and their down_proj (fc2) column divided by it: the layer computes the same function
   (exactly for Gemma's linear up branch, approximately through SigLIP's GELU), its down projection's input has
   outliers.
3. Massive activation: the BOS token's (id 2) embedding gets `massive` (60) times the embedding std on one more
   residual channel of the LM; every LM norm's gain on that channel is set to `1 / massive`, so after normalisation
   it is an ordinary value (the BOS token's other channels shrink, as in real models, where BOS is an attention
   sink). The final norm keeps its weight.
"""

from __future__ import annotations

import torch
from torch import nn


def _channels(width: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(width, generator=generator, device=generator.device)[:n].sort().values


def _set_gain(norm: nn.Module, ch: torch.Tensor, gain: float) -> None:
    if isinstance(norm, nn.LayerNorm):
        norm.weight[ch] = gain
    elif hasattr(norm, "weight"):
        norm.weight[ch] = gain - 1.0  # Gemma's gain is (1 + weight)
    else:  # adaRMS: (1 + scale) with scale = dense(cond)[:D]; its bias sets the baseline
        norm.dense.bias[ch] = gain - 1.0


@torch.no_grad()
def add_outliers(model: nn.Module, seed: int = 0, n_channels: int = 3, llm_gain: float = 40.0,
                 expert_gain: float = 30.0, vision_gain: float = 30.0, hidden_gain: float = 20.0,
                 massive: float = 60.0, bos_token: int = 2) -> None:
    g = torch.Generator().manual_seed(10_000 + seed)
    pwe = model.paligemma_with_expert
    lm = pwe.paligemma.model.language_model
    expert = pwe.gemma_expert.model
    vision = pwe.paligemma.model.vision_tower.vision_model

    def attn_mlp(la, norm1, norm2, mlp_in):  # (norm, the Linears that read its output) twice per block
        return [(getattr(la, norm1), (la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj)),
                (getattr(la, norm2), mlp_in)]

    stacks = [
        (lm, llm_gain, [attn_mlp(la, "input_layernorm", "post_attention_layernorm", (la.mlp.gate_proj, la.mlp.up_proj))
                        for la in lm.layers]),
        (expert, expert_gain, [attn_mlp(la, "input_layernorm", "post_attention_layernorm",
                                        (la.mlp.gate_proj, la.mlp.up_proj)) for la in expert.layers]),
        (vision, vision_gain, [attn_mlp(la, "layer_norm1", "layer_norm2", (la.mlp.fc1,))
                               for la in vision.encoder.layers]),
    ]
    lm_channels = None
    for stack, gain, layers in stacks:
        width = vision.post_layernorm.normalized_shape[0] if stack is vision else stack.cfg.width
        ch = _channels(width, n_channels + (1 if stack is lm else 0), g)
        if stack is lm:
            ch, lm_channels = ch[:n_channels], ch
        for norm_consumers in layers:
            for norm, consumers in norm_consumers:
                _set_gain(norm, ch, gain)
                for lin in consumers:
                    lin.weight[:, ch] /= gain**0.5
    for la in lm.layers:
        _hidden_outliers(la.mlp.up_proj, la.mlp.down_proj, n_channels, hidden_gain, g)
    for la in expert.layers:
        _hidden_outliers(la.mlp.up_proj, la.mlp.down_proj, n_channels, hidden_gain, g)
    for la in vision.encoder.layers:
        _hidden_outliers(la.mlp.fc1, la.mlp.fc2, n_channels, hidden_gain, g)

    # massive activation on BOS, tamed by small norm gains on its channel
    massive_ch = lm_channels[-1:]
    emb = lm.embed_tokens.weight
    bos = bos_token if emb.shape[0] > bos_token else 0
    emb[bos, massive_ch] = massive * emb.std()
    for la in lm.layers:
        for norm in (la.input_layernorm, la.post_attention_layernorm):
            _set_gain(norm, massive_ch, 1.0 / massive)


def _hidden_outliers(up: nn.Linear, down: nn.Linear, n: int, gain: float, g: torch.Generator) -> None:
    hidden = _channels(up.out_features, n, g)
    up.weight[hidden] *= gain
    if up.bias is not None:
        up.bias[hidden] *= gain
    down.weight[:, hidden] /= gain


add_massive_activations = add_outliers  # the earlier name
