"""The pi0 / pi0.5 model: openpi names and counts, masks, deterministic batched sampling, cache == full forward,
realistic outliers, numerics in fp32 and bf16."""

import numpy as np
import pytest
import torch
from torch import nn

from duquant.models import (
    CONFIG_NAMES,
    GEMMA_VARIANTS,
    PART_PREFIXES,
    build_policy,
    count_linear_by_part,
    get_config,
    make_att_2d_masks,
    make_synthetic_observation,
    to_openpi_precision,
)
from duquant.models.pi0 import euler_times, sinusoidal_time_embedding

LLM, DIT, VISION = PART_PREFIXES["llm"], PART_PREFIXES["dit"], PART_PREFIXES["vision"]


def noise(model, b, seed=0):
    cfg = model.config
    return torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["pi0-tiny", "pi05-tiny"])
def tiny(request):
    return build_policy(request.param)


# ---- structure ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_full_size_on_meta_counts_and_names(name):
    model = build_policy(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    counts = count_linear_by_part(model)
    assert (counts["llm"], counts["dit"], counts["vision"]) == (126, 126, 162)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    shapes = {  # (in, out) from openpi's gemma_2b / gemma_300m / So400m/14
        f"{LLM}layers.0.self_attn.q_proj": (2048, 2048), f"{LLM}layers.17.self_attn.k_proj": (2048, 256),
        f"{LLM}layers.0.mlp.gate_proj": (2048, 16384), f"{LLM}layers.0.mlp.down_proj": (16384, 2048),
        f"{DIT}layers.0.self_attn.q_proj": (1024, 2048), f"{DIT}layers.17.mlp.down_proj": (4096, 1024),
        f"{DIT}layers.0.self_attn.o_proj": (2048, 1024),
        f"{VISION}vision_model.encoder.layers.26.mlp.fc1": (1152, 4304),
        f"{VISION}vision_model.encoder.layers.0.self_attn.out_proj": (1152, 1152),
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear": (1152, 2048),
        "paligemma_with_expert.paligemma.lm_head": (2048, 257152),
        "paligemma_with_expert.gemma_expert.lm_head": (1024, 257152),
        "action_in_proj": (32, 1024), "action_out_proj": (1024, 32),
    }
    if name == "pi0":
        shapes.update({"state_proj": (32, 1024), "action_time_mlp_in": (2048, 1024),
                       "action_time_mlp_out": (1024, 1024)})
        assert "time_mlp_in" not in linears
    else:
        shapes.update({"time_mlp_in": (1024, 1024), "time_mlp_out": (1024, 1024),
                       f"{DIT}layers.0.input_layernorm.dense": (1024, 3072), f"{DIT}norm.dense": (1024, 3072)})
        assert "state_proj" not in linears
    for key, (i, o) in shapes.items():
        assert (linears[key].in_features, linears[key].out_features) == (i, o), key
    keys = set(model.state_dict())
    assert "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert f"{LLM}embed_tokens.weight" in keys and f"{DIT}embed_tokens.weight" not in keys
    assert (f"{DIT}layers.0.input_layernorm.weight" in keys) == (name == "pi0")
    n_params = sum(p.numel() for p in model.parameters())
    assert 3.0e9 < n_params < 4.0e9  # ~3.5B with the tied embedding counted once


def test_configs_follow_openpi():
    assert set(CONFIG_NAMES) >= {"pi0", "pi05", "pi0-tiny", "pi05-tiny"}
    g2, g3 = GEMMA_VARIANTS["gemma_2b"], GEMMA_VARIANTS["gemma_300m"]
    assert (g2.width, g2.depth, g2.mlp_dim, g2.num_heads, g2.num_kv_heads, g2.head_dim) == (2048, 18, 16384, 8, 1, 256)
    assert (g3.width, g3.depth, g3.mlp_dim, g3.num_heads, g3.num_kv_heads, g3.head_dim) == (1024, 18, 4096, 8, 1, 256)
    assert GEMMA_VARIANTS["gemma_2b_lora"] == g2 and GEMMA_VARIANTS["gemma_300m_lora"] == g3
    assert GEMMA_VARIANTS["dummy"].width == 64
    pi0, pi05 = get_config("pi0"), get_config("pi05")
    assert (pi0.max_token_len, pi05.max_token_len, pi0.action_dim, pi0.action_horizon) == (48, 200, 32, 50)
    v = pi0.vision
    assert (v.width, v.depth, v.mlp_dim, v.num_heads, v.num_patches) == (1152, 27, 4304, 16, 256)
    assert get_config("pi05", action_horizon=10).action_horizon == 10
    with pytest.raises(ValueError, match="unknown policy config"):
        get_config("pi1")


def test_make_att_2d_masks_block_semantics():
    # prefix of 3 (last one padding), state block, 2 action tokens
    pad = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    att = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    m = make_att_2d_masks(pad, att)[0].int()
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0],
                             [1, 1, 0, 1, 1, 1],
                             [1, 1, 0, 1, 1, 1]])
    assert torch.equal(m, expected)


def test_time_embedding_and_euler_schedule():
    t = torch.tensor([1.0, 0.5, 0.0])
    emb = sinusoidal_time_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    period = 4e-3 * (4.0 / 4e-3) ** np.linspace(0, 1, 4)
    np.testing.assert_allclose(emb[1, :4].numpy(), np.sin(2 * np.pi / period * 0.5), atol=1e-6)
    np.testing.assert_allclose(emb[2].numpy(), [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    times = euler_times(10)
    assert len(times) == 10 and times[0] == 1.0 and abs(times[-1] - 0.1) < 1e-6
    assert len(euler_times(3)) == 3 and len(euler_times(1)) == 1


# ---- sampling ----------------------------------------------------------------------------------------------------

def test_sampling_is_deterministic_and_batch_consistent(tiny):
    obs = make_synthetic_observation(tiny.config, batch_size=4, seed=3)
    a4 = tiny.sample_actions(obs, noise=noise(tiny, 4))
    assert a4.shape == (4, 50, tiny.config.action_dim) and a4.dtype == torch.float32
    assert torch.isfinite(a4).all() and a4.std() > 0.1
    assert torch.equal(a4, tiny.sample_actions(obs, noise=noise(tiny, 4)))
    for i in range(4):
        a1 = tiny.sample_actions(obs.select([i]), noise=noise(tiny, 4)[i:i + 1])
        assert torch.allclose(a1[0], a4[i], atol=1e-5), i
    g = torch.Generator().manual_seed(7)
    assert torch.equal(tiny.sample_actions(obs, generator=g), tiny.sample_actions(obs, noise=torch.randn(
        4, 50, tiny.config.action_dim, generator=torch.Generator().manual_seed(7))))


def test_same_seed_same_weights_and_actions():
    a, b = build_policy("pi0-tiny", seed=1), build_policy("pi0-tiny", seed=1)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert not torch.equal(a.action_in_proj.weight, build_policy("pi0-tiny", seed=2).action_in_proj.weight)
    obs = make_synthetic_observation(a.config, 1, seed=0)
    assert torch.equal(a.sample_actions(obs, noise=noise(a, 1)), b.sample_actions(obs, noise=noise(a, 1)))
    assert torch.equal(obs.state, make_synthetic_observation(a.config, 1, seed=0).state)


def test_prefix_cache_equals_full_forward(tiny):
    obs = make_synthetic_observation(tiny.config, batch_size=3, seed=4)
    x_t = noise(tiny, 3, seed=1)
    with torch.no_grad():
        past_kvs, prefix_pad = tiny.prefix_forward(obs)
        for t in (1.0, 0.55, 0.1):
            timestep = torch.full((3,), t)
            cached = tiny.denoise_step(obs.state, prefix_pad, past_kvs, x_t, timestep)
            full = tiny.velocity(obs, x_t, timestep)
            assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5), t
        loss = tiny(obs, x_t, noise=noise(tiny, 3, seed=2), time=torch.full((3,), 0.3))
    assert loss.shape == x_t.shape and torch.isfinite(loss).all()


def test_time_state_images_and_prompt_matter_padding_does_not(tiny):
    obs = make_synthetic_observation(tiny.config, batch_size=2, seed=5)
    ref = tiny.sample_actions(obs, noise=noise(tiny, 2))
    same = obs.select([0, 1])
    same.tokenized_prompt = torch.where(obs.tokenized_prompt_mask, obs.tokenized_prompt, 7)  # padding content
    same.images["right_wrist_0_rgb"] = torch.rand_like(obs.images["right_wrist_0_rgb"])  # masked camera
    assert torch.allclose(tiny.sample_actions(same, noise=noise(tiny, 2)), ref, atol=1e-5)
    dropped = obs.select([0, 1])  # an absent camera is the same as a masked one
    del dropped.images["right_wrist_0_rgb"], dropped.image_masks["right_wrist_0_rgb"]
    assert torch.allclose(tiny.sample_actions(dropped, noise=noise(tiny, 2)), ref, atol=1e-5)
    for change in ("image", "prompt", "state"):
        other = obs.select([0, 1])
        if change == "image":
            other.images["base_0_rgb"] = -obs.images["base_0_rgb"]
        elif change == "prompt":
            other.tokenized_prompt = torch.where(obs.tokenized_prompt_mask, 5, 0)
            other.tokenized_prompt[:, 0] = 2
        elif tiny.pi05:
            continue  # pi0.5 takes the state through the prompt (discrete state), not a state token
        else:
            other.state = obs.state + 1.0
        assert not torch.allclose(tiny.sample_actions(other, noise=noise(tiny, 2)), ref, atol=1e-3), change
    past_kvs, pad = tiny.prefix_forward(obs)
    x = noise(tiny, 2)
    v1, v0 = (tiny.denoise_step(obs.state, pad, past_kvs, x, torch.full((2,), t)) for t in (1.0, 0.2))
    assert (v1 - v0).abs().max() > 1e-3  # the flow-matching time reaches the velocity


def test_uint8_and_other_sizes_are_preprocessed_like_openpi(tiny):
    obs = make_synthetic_observation(tiny.config, batch_size=1, seed=6)
    u8 = obs.select([0])
    u8.images = {k: ((v + 1) / 2 * 255).round().to(torch.uint8) for k, v in obs.images.items()}
    as_float = obs.select([0])
    as_float.images = {k: v.float() / 255 * 2 - 1 for k, v in u8.images.items()}
    n = noise(tiny, 1)
    assert torch.equal(tiny.sample_actions(u8, noise=n), tiny.sample_actions(as_float, noise=n))
    small = obs.select([0])
    small.images = {k: torch.nn.functional.interpolate(v, size=(112, 160)) for k, v in obs.images.items()}
    assert torch.isfinite(tiny.sample_actions(small, noise=noise(tiny, 1))).all()


# ---- numerics and realism --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_bf16_and_openpi_mixed_precision_stay_close_to_fp32(name):
    ref_model = build_policy(name)
    obs = make_synthetic_observation(ref_model.config, batch_size=2, seed=8)
    ref = ref_model.sample_actions(obs, noise=noise(ref_model, 2))
    bf16 = build_policy(name, dtype=torch.bfloat16)
    mixed = to_openpi_precision(build_policy(name))
    assert mixed.action_in_proj.weight.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    layer = mixed.paligemma_with_expert.gemma_expert.model.layers[0]
    assert next(layer.input_layernorm.parameters()).dtype == torch.float32  # openpi keeps norms in fp32
    assert layer.mlp.up_proj.weight.dtype == torch.bfloat16
    for model in (bf16, mixed):
        out = model.sample_actions(obs, noise=noise(model, 2))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def linear_input_absmax(model, leaves=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1")):
    """Per-channel absmax of the inputs of the block Linears named `leaves`, over one batch-2 sample."""
    absmax = {}

    def record(key):
        def hook(module, args):
            a = args[0].detach().float().abs().flatten(0, -2).amax(0)
            absmax[key] = a if key not in absmax else torch.maximum(absmax[key], a)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves and ".layers." in n]
    model.sample_actions(make_synthetic_observation(model.config, 2, seed=0), noise=noise(model, 2))
    for h in hooks:
        h.remove()
    return absmax


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_outliers_visible_in_linear_inputs(name):
    """Every q/k/v and gate/up (SigLIP: fc1) input has channels whose absmax is >= 20x the median channel's."""
    absmax = linear_input_absmax(build_policy(name))
    assert len(absmax) == 5 * 4 * 2 + 4 * 3
    for n, a in absmax.items():
        assert a.max() >= 20 * a.median(), n
    down = linear_input_absmax(build_policy(name), leaves=("down_proj",))
    assert all(a.max() >= 10 * a.median() for a in down.values())
    plain = linear_input_absmax(build_policy(name, realistic=False))  # random weights alone have no outliers
    assert max((a.max() / a.median()).item() for a in plain.values()) < 10
