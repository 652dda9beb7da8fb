"""Checkpoints with openpi's key names: strict loading, tied embeddings, bit-exact round trips, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from duquant.models import (
    CheckpointError,
    build_policy,
    load_policy,
    make_synthetic_observation,
    read_checkpoint_keys,
    save_policy,
)
from duquant.models.loading import TIED

LM_HEAD, EMBED = TIED


@pytest.fixture(scope="module", params=["pi0-tiny", "pi05-tiny"])
def saved(request, tmp_path_factory):
    model = build_policy(request.param)
    d = tmp_path_factory.mktemp(request.param)
    save_policy(model, d)
    return model, d


def noise(b):
    return torch.randn(b, 50, 32, generator=torch.Generator().manual_seed(0))


def test_save_writes_openpi_layout(saved):
    model, d = saved
    keys = read_checkpoint_keys(d)
    assert LM_HEAD in keys and EMBED not in keys  # safetensors' save_model keeps one name of the tied pair
    assert set(keys) | {EMBED} == set(model.state_dict())
    cj = json.loads((d / "config.json").read_text())
    assert {"action_dim": 32, "action_horizon": 50, "paligemma_variant": "gemma_tiny",
            "action_expert_variant": "gemma_tiny_expert"}.items() <= cj.items()


def test_roundtrip_is_bit_exact_and_detects_the_config(saved):
    model, d = saved
    loaded = load_policy(d)
    assert loaded.config == model.config
    sd = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    pg = loaded.paligemma_with_expert.paligemma
    assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight  # tied again
    obs = make_synthetic_observation(model.config, 2, seed=1)
    assert torch.equal(loaded.sample_actions(obs, noise=noise(2)), model.sample_actions(obs, noise=noise(2)))
    bf16 = load_policy(d / "model.safetensors", config=model.config.name, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_openpi_state_dict_loads_strictly_from_either_tied_name_and_bf16(saved, tmp_path):
    """A file as openpi's converter writes it (plain keys, bf16, either one of the tied pair)."""
    model, _ = saved
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    for keep in (LM_HEAD, EMBED):
        drop = EMBED if keep == LM_HEAD else LM_HEAD
        (tmp_path / keep).mkdir()
        save_file({k: v for k, v in sd.items() if k != drop}, str(tmp_path / keep / "model.safetensors"))
        loaded = load_policy(tmp_path / keep, dtype=torch.float32)  # no config.json: detected from the keys
        assert loaded.config.pi05 == model.config.pi05
        assert torch.equal(loaded.paligemma_with_expert.paligemma.lm_head.weight, sd[EMBED].float())
        assert torch.equal(loaded.action_out_proj.weight, sd["action_out_proj.weight"].float())


def test_pi0_pi05_mismatch_is_explained(tmp_path):
    for name, other, needle in (("pi0-tiny", "pi05-tiny", "pi0 checkpoint loaded into a pi0.5 config"),
                                ("pi05-tiny", "pi0-tiny", "pi0.5 checkpoint loaded into a pi0 config")):
        save_policy(build_policy(name), tmp_path / name)
        with pytest.raises(CheckpointError, match=needle) as err:
            load_policy(tmp_path / name, config=other)
        assert "missing key(s)" in str(err.value) and "unexpected key(s)" in str(err.value)


def test_wrong_prefix_and_missing_keys_are_explained(saved, tmp_path):
    model, d = saved
    sd = load_file(str(d / "model.safetensors"))
    # Every key under "model." is LeRobot's layout: the one loader reads it.
    save_file({f"model.{k}": v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    lerobot = load_policy(tmp_path, config=model.config.name)
    assert torch.equal(lerobot.action_out_proj.weight, model.action_out_proj.weight)
    save_file({f"policy.{k}": v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="extra prefix 'policy.'"):
        load_policy(tmp_path, config=model.config.name)
    with pytest.raises(CheckpointError, match="cannot recognise"):
        load_policy(tmp_path)  # nothing to detect a config from
    del sd["action_out_proj.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \['action_out_proj.bias'\]"):
        load_policy(tmp_path, config=model.config.name)
    partial = load_policy(tmp_path, config=model.config.name, strict=False)
    assert torch.equal(partial.action_out_proj.weight, model.action_out_proj.weight)


def test_wrong_shapes_and_corrupt_files_fail_clearly(saved, tmp_path):
    model, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["action_in_proj.weight"] = torch.zeros(128, 7)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shape, e.g. action_in_proj.weight: \(128, 7\)"):
        load_policy(tmp_path, config=model.config.name)
    data = (d / "model.safetensors").read_bytes()
    for i, bad in enumerate((data[: len(data) // 2], b"\x00" * 64, data[:4])):
        (tmp_path / f"bad{i}").mkdir()
        (tmp_path / f"bad{i}" / "model.safetensors").write_bytes(bad)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_policy(tmp_path / f"bad{i}", config=model.config.name)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_policy(tmp_path / "nothing")


def test_meta_build_allocates_nothing_and_loads_by_assignment():
    model = build_policy("pi05", device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    pg = model.paligemma_with_expert.paligemma
    assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight
