"""Build, load and save policies. Full-size configs can be built on the `meta` device (nothing allocated)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from duquant.models.config import CONFIGS, PolicyConfig, get_config
from duquant.models.pi0 import PI0Policy

TIED = ("paligemma_with_expert.paligemma.lm_head.weight",
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "fc2")


class CheckpointError(ValueError):
    """A checkpoint does not match the model; the message lists the offending keys and the likely cause."""


def _init_weights(model: PI0Policy) -> None:
    """Seeded initialisation with sane activation scales (Gaussian weights, residual-scaled outputs)."""
    depth = max(model.config.llm.depth, model.config.expert.depth, model.config.vision.depth)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            std = m.in_features ** -0.5
            if name.endswith(_OUTPUT_PROJECTIONS):
                std /= (2 * depth) ** 0.5
            if name.endswith(".dense"):  # adaRMS modulation: small, so time still matters
                std = 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, m.embedding_dim ** -0.5)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** -0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    pos = model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_embedding
    nn.init.normal_(pos.weight, 0.0, 0.1)


def build_policy(name: str | PolicyConfig = "pi0-tiny", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, realistic: bool | None = None) -> PI0Policy:
    """A policy with seeded random weights (`meta`: shapes only). Tiny configs get realistic activation outliers
    by default (see duquant.models.synthetic)."""
    cfg = name if isinstance(name, PolicyConfig) else get_config(name)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return PI0Policy(cfg).to(dtype).eval()
    build_device = device if torch.device(device).type == "cuda" else "cpu"  # full size: initialise on the GPU
    with torch.random.fork_rng(devices=[]), torch.device(build_device):
        torch.manual_seed(seed)
        model = PI0Policy(cfg)
        _init_weights(model)
        if realistic if realistic is not None else cfg.name.endswith("-tiny"):
            from duquant.models.synthetic import add_massive_activations

            add_massive_activations(model, seed=seed)
    return model.to(device=device, dtype=dtype).eval()


def _checkpoint_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}; pass a directory holding model.safetensors or the file itself")
    return p


def read_checkpoint_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    file = _checkpoint_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt "
                              "- re-export it (openpi: examples/convert_jax_model_to_pytorch.py)") from err


def detect_config(keys: dict[str, tuple[int, ...]]) -> PolicyConfig:
    """pi0 vs pi0.5 from the keys, size from the language model's width."""
    pi05 = any(k.startswith("time_mlp_in.") or ".input_layernorm.dense." in k for k in keys)
    embed = keys.get(TIED[1]) or keys.get(TIED[0])
    if embed is None:
        raise CheckpointError("cannot find the language model's embedding (or lm_head) in the checkpoint; keys start "
                              f"with {sorted(keys)[:3]} - a LeRobot checkpoint has a 'model.' prefix (load it with "
                              "duquant.models.checkpoints.load_checkpoint)")
    for cfg in CONFIGS.values():
        if cfg.pi05 == pi05 and cfg.llm.width == embed[1] and cfg.llm.vocab_size == embed[0]:
            return cfg
    raise CheckpointError(f"no built-in config has a {embed[1]}-wide language model with vocab {embed[0]}; "
                          "pass config=")


def _likely_cause(missing: list[str], unexpected: list[str], cfg: PolicyConfig) -> str:
    keys = missing + unexpected
    if any(k.startswith("model.") for k in unexpected):
        return "the checkpoint keys carry a 'model.' prefix (LeRobot layout): use duquant.models.checkpoints"
    pi0_keys = ("state_proj.", "action_time_mlp_in.")
    pi05_keys = ("time_mlp_in.", ".input_layernorm.dense.")
    if any(k.startswith(pi0_keys) for k in unexpected) or any(any(p in k for p in pi05_keys) for k in missing):
        if cfg.pi05:
            return "this looks like a pi0 checkpoint loaded into a pi0.5 config (use config='pi0')"
    if any(k.startswith(pi05_keys[0]) or pi05_keys[1] in k for k in unexpected) or any(
            k.startswith(pi0_keys) for k in missing):
        if not cfg.pi05:
            return "this looks like a pi0.5 checkpoint loaded into a pi0 config (use config='pi05')"
    if keys and all(".layers." in k for k in keys):
        return "the number of layers differs (wrong size variant?)"
    return "the checkpoint was written for a different model or variant"


def load_policy(path: str | os.PathLike, config: str | PolicyConfig | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, strict: bool = True) -> PI0Policy:
    """Load `model.safetensors` (bf16 or fp32) with openpi's key names into our policy."""
    file = _checkpoint_file(path)
    keys = read_checkpoint_keys(file)
    cfg = get_config(config) if isinstance(config, str) else config or detect_config(keys)
    model = build_policy(cfg, device="meta", dtype=dtype)
    expected = model.state_dict()
    try:
        tensors = load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file} could not be read ({err}); it may be truncated or corrupt") from err
    for a, b in (TIED, TIED[::-1]):  # restore whichever of the tied pair save_model dropped
        if a not in tensors and b in tensors:
            tensors[a] = tensors[b]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {file} does not match config {cfg.name!r}: {len(missing)} missing key(s) "
            f"{missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}; likely cause: "
            f"{_likely_cause(missing, unexpected, cfg)}")
    bad_shapes = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if bad_shapes:
        k, got, want = bad_shapes[0]
        raise CheckpointError(f"{len(bad_shapes)} tensor(s) have the wrong shape, e.g. {k}: {got} in the file, "
                              f"{want} in config {cfg.name!r}; pass the matching config")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k in expected}
    model.load_state_dict(state, strict=strict, assign=True)
    pg = model.paligemma_with_expert.paligemma
    pg.lm_head.weight = pg.model.language_model.embed_tokens.weight  # re-tie after assign
    return model.to(device).eval()


def save_policy(model: PI0Policy, directory: str | os.PathLike) -> Path:
    """Write `model.safetensors` (tied weights stored once, as safetensors' save_model and openpi do) and
    `config.json` with openpi's fields."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, directory / "model.safetensors")
    cfg = model.config
    meta = {"action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
            "paligemma_variant": cfg.paligemma_variant, "action_expert_variant": cfg.action_expert_variant,
            "pi05": cfg.pi05, "precision": str(model.dtype).replace("torch.", ""), "duquant_config": cfg.name}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    return directory / "model.safetensors"
