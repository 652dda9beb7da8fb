"""openpi- and LeRobot-format checkpoint directories: detection, every openpi variant, identical actions."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from duquant.models import CheckpointError, build_policy, load_policy
from duquant.models.checkpoints import (
    LEROBOT,
    OPENPI,
    config_from_checkpoint,
    find_norm_stats,
    inspect_checkpoint,
    load_checkpoint_with_info,
    save_lerobot_checkpoint,
    save_openpi_checkpoint,
    to_openpi_keys,
)
from duquant.models.config import SIGLIP_SO400M, PolicyConfig
from duquant.serve.policy import PolicySpec, create_policy, load_norm_stats

NORM = {"state": {"mean": np.linspace(-1, 1, 8), "std": np.linspace(0.5, 1.5, 8), "q01": -np.ones(8) * 2,
                  "q99": np.ones(8) * 2},
        "actions": {"mean": np.linspace(-0.5, 0.5, 7), "std": np.full(7, 0.7), "q01": -np.ones(7),
                    "q99": np.ones(7) * 1.5}}


def obs(seed=0):
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8), "prompt": "put the bowl on the plate"}


@pytest.fixture(scope="module", params=["pi0-tiny", "pi05-tiny"])
def dirs(request, tmp_path_factory):
    model = build_policy(request.param, seed=1)
    root = tmp_path_factory.mktemp(request.param)
    save_openpi_checkpoint(model, root / "openpi", norm_stats=NORM)
    save_lerobot_checkpoint(model, root / "lerobot", norm_stats=NORM)
    return model, root / "openpi", root / "lerobot"


def test_layouts_on_disk(dirs):
    model, op, lr = dirs
    op_keys, lr_keys = set(load_file(op / "model.safetensors")), set(load_file(lr / "model.safetensors"))
    assert all(k.startswith("model.") for k in lr_keys) and not any(k.startswith("model.") for k in op_keys)
    tied = {"paligemma_with_expert.paligemma.lm_head.weight",
            "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"}
    assert len(tied & op_keys) == 1 and len({"model." + k for k in tied} & lr_keys) == 1  # stored once
    assert (op / "assets/physical-intelligence/libero/norm_stats.json").exists()
    assert json.loads((op / "config.json").read_text())["paligemma_variant"] == model.config.paligemma_variant
    assert json.loads((lr / "config.json").read_text())["type"] == ("pi05" if model.config.pi05 else "pi0")


def test_both_formats_load_and_give_identical_actions(dirs):
    model, op, lr = dirs
    a, ia = load_checkpoint_with_info(op)
    b, ib = load_checkpoint_with_info(lr)
    assert (ia.format, ib.format) == (OPENPI, LEROBOT) and ia.pi05 == ib.pi05 == model.config.pi05
    assert ia.config.name == ib.config.name == model.config.name
    sa, sb, ref = a.state_dict(), b.state_dict(), model.state_dict()
    assert set(sa) == set(sb) == set(ref)
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], ref[k]) for k in ref)
    pg = a.paligemma_with_expert.paligemma
    assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight  # re-tied

    # through the server's policy: norm stats from each layout, same actions
    pa = create_policy(PolicySpec(checkpoint=str(op), noise_seed=0))
    pb = create_policy(PolicySpec(checkpoint=str(lr), noise_seed=0))
    for k in ("state", "actions"):
        np.testing.assert_allclose(pa.pre.norm_stats[k].mean, pb.pre.norm_stats[k].mean, rtol=1e-6)
    assert pa.transforms == pb.transforms
    for i in range(2):
        xa, xb = pa.infer(obs(i))["actions"], pb.infer(obs(i))["actions"]
        assert xa.shape == (model.config.action_horizon, 7)
        np.testing.assert_allclose(xa, xb, rtol=1e-6, atol=1e-6)


def test_legacy_time_mlp_names_and_state_proj_are_fixed(dirs, tmp_path):
    """LeRobot's loader renames time_mlp <-> action_time_mlp by variant and drops state_proj for pi0.5."""
    model, op, _ = dirs
    sd = load_file(op / "model.safetensors")
    if model.config.pi05:
        sd = {
            k.replace("time_mlp_", "action_time_mlp_") if k.startswith("time_mlp_") else k: v
            for k, v in sd.items()
        }
        sd["state_proj.weight"] = torch.zeros(128, 32)
        for i in range(model.config.expert.depth):
            sd[f"paligemma_with_expert.gemma_expert.model.layers.{i}.input_layernorm.weight"] = torch.zeros(
                128
            )
    else:
        sd = {k.replace("action_time_mlp_", "time_mlp_") if k.startswith("action_time_mlp_") else k: v
              for k, v in sd.items()}
    (tmp_path / "ck").mkdir()
    save_file(
        {"model." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ck" / "model.safetensors")
    )
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"type": "pi05" if model.config.pi05 else "pi0"}))
    loaded = load_policy(tmp_path / "ck")
    ref = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], ref[k]) for k in ref)


@pytest.mark.parametrize("pi05", [False, True])
@pytest.mark.parametrize("llm,expert", [("gemma_2b", "gemma_300m"), ("gemma_2b_lora", "gemma_300m_lora"),
                                        ("gemma_2b", "gemma_300m_lora"), ("dummy", "dummy")])
def test_every_openpi_variant_is_recognised(pi05, llm, expert):
    """Shapes of a model built by each variant (meta device: nothing allocated) -> the same config back."""
    cfg = PolicyConfig(
        "x",
        pi05=pi05,
        paligemma_variant=llm,
        action_expert_variant=expert,
        vision=SIGLIP_SO400M,
        action_horizon=10,
    )
    shapes = {k: tuple(v.shape) for k, v in build_policy(cfg, device="meta").state_dict().items()}
    # openpi's save_model keeps one of the tied pair
    shapes.pop("paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
    cj = {"action_dim": 32, "action_horizon": 10, "paligemma_variant": llm, "action_expert_variant": expert,
          "precision": "bfloat16"}
    got = config_from_checkpoint(to_openpi_keys(shapes, pi05), cj)
    assert (got.pi05, got.paligemma_variant, got.action_expert_variant, got.vision, got.action_horizon) == (
        pi05, llm, expert, SIGLIP_SO400M, 10)
    assert got.max_token_len == (200 if pi05 else 48)
    # without config.json, the plain variant of that shape
    bare = config_from_checkpoint(to_openpi_keys(shapes, pi05))
    assert bare.paligemma_variant == llm.replace("_lora", "")


def test_variant_mismatch_names_the_key():
    cfg = PolicyConfig("x", paligemma_variant="dummy", action_expert_variant="dummy", vision=SIGLIP_SO400M)
    shapes = {k: tuple(v.shape) for k, v in build_policy(cfg, device="meta").state_dict().items()}
    with pytest.raises(CheckpointError, match="gemma_2b.*language_model.layers.0.mlp.gate_proj"):
        config_from_checkpoint(shapes, {"paligemma_variant": "gemma_2b", "action_expert_variant": "dummy"})
    with pytest.raises(CheckpointError, match="openpi defines"):
        config_from_checkpoint(shapes, {"paligemma_variant": "gemma_7b"})


def test_missing_and_corrupt_checkpoints_say_what_is_wrong(dirs, tmp_path):
    _, op, _ = dirs
    sd = load_file(op / "model.safetensors")
    dropped = "action_out_proj.bias"
    (tmp_path / "ck").mkdir()
    save_file({k: v for k, v in sd.items() if k != dropped}, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=dropped):
        load_policy(tmp_path / "ck")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        inspect_checkpoint(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        inspect_checkpoint(tmp_path / "nothing")


def test_norm_stats_lookup(dirs, tmp_path):
    _, op, lr = dirs
    assert find_norm_stats(op).name == "norm_stats.json"
    assert find_norm_stats(lr).name.endswith("normalizer_processor.safetensors")
    assert find_norm_stats(op, asset_id="other/robot") is None
    a, b = load_norm_stats(find_norm_stats(op)), load_norm_stats(find_norm_stats(lr))
    np.testing.assert_allclose(a["actions"].q99, b["actions"].q99, rtol=1e-6)
    # a checkpoint without norm stats is refused unless --norm none
    (tmp_path / "nostats").mkdir()
    for f in ("model.safetensors", "config.json"):
        (tmp_path / "nostats" / f).write_bytes((op / f).read_bytes())
    with pytest.raises(FileNotFoundError, match="--norm-stats"):
        create_policy(PolicySpec(checkpoint=str(tmp_path / "nostats")))
    assert create_policy(PolicySpec(checkpoint=str(tmp_path / "nostats"), norm="none")).pre.norm_stats == {}


def test_load_policy_is_the_one_front_door_for_both_layouts(dirs):
    """`duquant.models.load_policy(dir)` reads openpi's and LeRobot's directories alike, with the same actions."""
    from duquant.models import make_synthetic_observation

    model, op, lr = dirs
    a, b = load_policy(op), load_policy(lr)
    obs = make_synthetic_observation(model.config, batch_size=1, seed=3)
    shape = (1, model.config.action_horizon, model.config.action_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref = model.sample_actions(obs, noise=noise)
    # Identical weights; fp32 matmuls on freshly loaded (differently laid out) tensors may round differently.
    assert a.config == b.config == model.config
    torch.testing.assert_close(a.sample_actions(obs, noise=noise), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.sample_actions(obs, noise=noise), ref, rtol=0, atol=1e-5)
