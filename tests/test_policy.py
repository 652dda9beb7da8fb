"""Our pi0 / pi0.5: openpi names and counts, deterministic sampling, masks, checkpoints."""

import pytest
import torch
from torch import nn

from duquant.models import (
    CheckpointError,
    build_policy,
    count_linear_by_part,
    load_observations,
    load_policy,
    make_synthetic_observation,
    save_observations,
    save_policy,
)
from duquant.models.observation import resize_with_pad


def noise(model, b, seed=0):
    return torch.randn(b, model.config.action_horizon, model.config.action_dim,
                       generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["pi0-tiny", "pi05-tiny"])
def tiny(request):
    return build_policy(request.param)


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_full_size_counts_on_meta(name):
    model = build_policy(name, device="meta")
    counts = count_linear_by_part(model)
    assert (counts["llm"], counts["dit"], counts["vision"]) == (126, 126, 162)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key in ("paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj",
                "paligemma_with_expert.gemma_expert.model.layers.17.mlp.down_proj",
                "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc2",
                "paligemma_with_expert.paligemma.model.multi_modal_projector.linear",
                "paligemma_with_expert.gemma_expert.lm_head", "action_in_proj", "action_out_proj"):
        assert key in names
    extra = {"state_proj", "action_time_mlp_in", "action_time_mlp_out"} if name == "pi0" else {
        "time_mlp_in", "time_mlp_out", "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense"}
    assert extra <= names
    q = model.get_submodule("paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj")
    assert (q.in_features, q.out_features) == (2048, 2048)
    fc1 = model.get_submodule("paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0."
                              "mlp.fc1")
    assert (fc1.in_features, fc1.out_features) == (1152, 4304)


@pytest.mark.parametrize("batch", [1, 4])
def test_sampling_is_deterministic_and_batch_consistent(tiny, batch):
    obs = make_synthetic_observation(tiny.config, batch_size=4, seed=3)
    a = tiny.sample_actions(obs, noise=noise(tiny, 4))
    assert a.shape == (4, 50, tiny.config.action_dim) and torch.isfinite(a).all()
    sub = list(range(batch))
    b = tiny.sample_actions(obs.select(sub), noise=noise(tiny, 4)[sub])
    assert torch.allclose(a[sub], b, atol=1e-5)
    assert torch.equal(b, tiny.sample_actions(obs.select(sub), noise=noise(tiny, 4)[sub]))


def test_padding_and_masked_cameras_do_not_matter(tiny):
    obs = make_synthetic_observation(tiny.config, batch_size=2, seed=5)
    ref = tiny.sample_actions(obs, noise=noise(tiny, 2))
    changed = obs.select([0, 1])
    changed.tokenized_prompt = torch.where(obs.tokenized_prompt_mask, obs.tokenized_prompt, 7)
    changed.images["right_wrist_0_rgb"] = torch.rand_like(obs.images["right_wrist_0_rgb"])  # mask is False
    assert torch.allclose(tiny.sample_actions(changed, noise=noise(tiny, 2)), ref, atol=1e-5)
    visible = obs.select([0, 1])
    visible.images["base_0_rgb"] = -obs.images["base_0_rgb"]
    assert not torch.allclose(tiny.sample_actions(visible, noise=noise(tiny, 2)), ref, atol=1e-3)


def test_outliers_visible_in_linear_inputs():
    model = build_policy("pi0-tiny")
    seen = {}
    names = ["paligemma_with_expert.paligemma.model.language_model.layers.1.self_attn.q_proj",
             "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.up_proj",
             "paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj",
             "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.mlp.fc1"]

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].detach().abs().flatten(0, -2).amax(0))
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    model.sample_actions(make_synthetic_observation(model.config, 2, 0), noise=noise(model, 2))
    for h in hooks:
        h.remove()
    for n in names:
        assert seen[n].max() > 10 * seen[n].median(), n


def test_save_load_roundtrip_bit_exact(tmp_path, tiny):
    save_policy(tiny, tmp_path)
    assert (tmp_path / "config.json").exists()
    loaded = load_policy(tmp_path)
    assert loaded.config.name == tiny.config.name
    for (k, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    obs = make_synthetic_observation(tiny.config, 2, 1)
    assert torch.equal(loaded.sample_actions(obs, noise=noise(tiny, 2)), tiny.sample_actions(obs, noise=noise(tiny, 2)))
    bf16 = load_policy(tmp_path, dtype=torch.bfloat16)
    assert bf16.action_in_proj.weight.dtype == torch.bfloat16


def test_mismatched_and_corrupt_checkpoints_fail_clearly(tmp_path):
    pi0 = build_policy("pi0-tiny")
    save_policy(pi0, tmp_path / "pi0")
    with pytest.raises(CheckpointError, match="pi0 checkpoint loaded into a pi0.5 config"):
        load_policy(tmp_path / "pi0", config="pi05-tiny")
    data = (tmp_path / "pi0" / "model.safetensors").read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_policy(tmp_path / "bad", config="pi0-tiny")
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "nothing")


def test_observation_files_roundtrip(tmp_path, tiny):
    obs = make_synthetic_observation(tiny.config, 3, 2)
    for suffix in (".safetensors", ".npz"):
        save_observations(tmp_path / f"o{suffix}", obs)
        back = load_observations(tmp_path / f"o{suffix}")
        assert torch.equal(back.state, obs.state) and torch.equal(back.images["base_0_rgb"], obs.images["base_0_rgb"])
        assert torch.equal(back.tokenized_prompt_mask, obs.tokenized_prompt_mask)


def test_resize_with_pad_keeps_aspect():
    img = torch.full((1, 100, 200, 3), 255, dtype=torch.uint8)
    out = resize_with_pad(img, 224, 224)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.uint8
    assert out[0, :, 0].max() == 0 and out[0, :, 112].min() == 255  # padded top rows, image in the middle
