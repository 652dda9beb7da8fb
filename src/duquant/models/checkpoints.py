"""Checkpoint directories as users have them: openpi's PyTorch layout and LeRobot's `pi0` / `pi05` layout.

openpi (`examples/convert_jax_model_to_pytorch.py`):
    model.safetensors    PI0Pytorch keys, no prefix, tied lm_head / embed_tokens stored once
    config.json          {action_dim, action_horizon, paligemma_variant, action_expert_variant, precision}
    assets/<asset_id>/norm_stats.json    {"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}
LeRobot (`PI0Policy` / `PI05Policy.save_pretrained`):
    model.safetensors    "model." + the same keys (tied pair stored once)
    config.json          {"type": "pi0" | "pi05", paligemma_variant, action_expert_variant, chunk_size,
                          max_action_dim, tokenizer_max_length, ...}
    policy_preprocessor_step_*_normalizer_processor.safetensors    "observation.state.mean", "action.q01", ...

Keys are normalised to openpi's names the way LeRobot's own loader does it: strip one leading "model.", rename
the time MLP for the variant (pi0: `action_time_mlp_*`, pi0.5: `time_mlp_*`), drop `state_proj` and the
expert's plain RMSNorm weights for pi0.5 (adaRMS replaces them), and restore whichever of the tied embedding
pair was not stored. pi0 vs pi0.5 comes from the keys; the Gemma variants from `config.json` (checked against
the shapes) or, without it, from the shapes; SigLIP from the shapes. Every variant openpi defines loads:
gemma_2b, gemma_300m, their _lora forms (same shapes: adapters are merged) and `dummy` (with openpi's
full-size SigLIP).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from duquant.models.config import (
    CONFIGS,
    GEMMA_VARIANTS,
    SIGLIP_SO400M,
    SIGLIP_TINY,
    GemmaConfig,
    PolicyConfig,
    SiglipConfig,
)
from duquant.models.loading import TIED, CheckpointError, build_policy
from duquant.models.pi0 import PI0Policy

OPENPI, LEROBOT = "openpi", "lerobot"
LEROBOT_PREFIX = "model."
LLM = "paligemma_with_expert.paligemma.model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."
VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
KNOWN_SIGLIP = (SIGLIP_SO400M, SIGLIP_TINY)
DEFAULT_ASSET_ID = "physical-intelligence/libero"
# openpi Pi0Config defaults; pi0.5 uses a longer prompt (state tokens)
DEFAULT_MAX_TOKEN_LEN = {False: 48, True: 200}
_EXPERT_PLAIN_NORM = re.compile(
    re.escape(EXPERT) + r"(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)"
    r"\.weight$"
)


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, before any tensor is read."""

    path: Path
    weights: Path
    format: str  # "openpi" | "lerobot"
    pi05: bool
    config: PolicyConfig
    config_json: dict = field(default_factory=dict)
    norm_stats: Path | None = None  # openpi norm_stats.json or LeRobot normalizer safetensors

    def describe(self) -> str:
        c = self.config
        return (f"{self.format} checkpoint {self.path}: {'pi0.5' if self.pi05 else 'pi0'}, "
                f"{c.paligemma_variant} + {c.action_expert_variant}, action_dim {c.action_dim}, "
                f"horizon {c.action_horizon}, norm stats {self.norm_stats or 'none'}")


# ---- keys --------------------------------------------------------------------------------------------------

def read_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt"
        ) from err


def detect_format(keys) -> str:
    keys = list(keys)
    prefixed = sum(k.startswith(LEROBOT_PREFIX) for k in keys)
    return LEROBOT if keys and prefixed == len(keys) else OPENPI


def detect_pi05(keys) -> bool:
    """pi0.5: time MLP without the action (`time_mlp_in`) or adaRMS norms in the expert; pi0: `state_proj`."""
    keys = [_strip(k) for k in keys]
    if any(k.startswith("time_mlp_in.") or (k.startswith(EXPERT) and ".dense." in k) for k in keys):
        return True
    if any(k.startswith(("state_proj.", "action_time_mlp_in.")) for k in keys):
        return False
    raise CheckpointError(
        "cannot tell pi0 from pi0.5: the checkpoint has neither state_proj / action_time_mlp_in "
        "(pi0) nor time_mlp_in / adaRMS norms (pi0.5); keys start with " + str(sorted(keys)[:3])
    )


def _strip(key: str) -> str:
    return key[len(LEROBOT_PREFIX):] if key.startswith(LEROBOT_PREFIX) else key


def to_openpi_keys(tensors: dict, pi05: bool) -> dict:
    """LeRobot or openpi state dict (tensors or shapes) -> openpi PI0Pytorch names, for the variant given."""
    out = {}
    for key, value in tensors.items():
        key = _strip(key)
        if pi05:
            if key.startswith("state_proj.") or _EXPERT_PLAIN_NORM.match(key):
                continue  # no state token in pi0.5; adaRMS replaces the expert's plain norms
            key = re.sub(r"^action_time_mlp_(in|out)\.", r"time_mlp_\1.", key)
        else:
            key = re.sub(r"^time_mlp_(in|out)\.", r"action_time_mlp_\1.", key)
        out[key] = value
    for a, b in (TIED, TIED[::-1]):  # the tied pair is stored once: restore the other name
        if a not in out and b in out:
            out[a] = out[b]
    return out


# ---- config from config.json + shapes ----------------------------------------------------------------------

def _depth(shapes: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _gemma_from_shapes(shapes: dict, prefix: str) -> tuple[int, int, int]:
    gate = shapes.get(prefix + "layers.0.mlp.gate_proj.weight")
    if gate is None:
        raise CheckpointError(f"no {prefix}layers.0.mlp.gate_proj.weight in the checkpoint")
    return gate[1], _depth(shapes, prefix), gate[0]


def _pick_variant(name: str | None, shapes: dict, prefix: str, role: str) -> str:
    width, depth, mlp = _gemma_from_shapes(shapes, prefix)
    if name is not None:
        if name not in GEMMA_VARIANTS:
            raise CheckpointError(f"config.json names {role} variant {name!r}; openpi defines "
                                  f"{sorted(v for v in GEMMA_VARIANTS if 'tiny' not in v)}")
        g: GemmaConfig = GEMMA_VARIANTS[name]
        if (g.width, g.depth, g.mlp_dim) != (width, depth, mlp):
            raise CheckpointError(
                f"config.json says {role} variant {name!r} (width {g.width}, {g.depth} layers, "
                f"mlp {g.mlp_dim}) but the weights have width {width}, {depth} layers, mlp {mlp} "
                f"(key {prefix}layers.0.mlp.gate_proj.weight, {_depth(shapes, prefix)} layers under {prefix})"
            )
        return name
    for vname, g in GEMMA_VARIANTS.items():  # plain names come first in the table
        if (g.width, g.depth, g.mlp_dim) == (width, depth, mlp):
            return vname
    raise CheckpointError(
        f"the {role} has width {width}, {depth} layers, mlp {mlp}: no Gemma variant has that "
        f"shape (known: {sorted(GEMMA_VARIANTS)})"
    )


def _siglip_from_shapes(shapes: dict) -> SiglipConfig:
    patch = shapes.get(VISION + "embeddings.patch_embedding.weight")
    fc1 = shapes.get(VISION + "encoder.layers.0.mlp.fc1.weight")
    pos = shapes.get(VISION + "embeddings.position_embedding.weight")
    if patch is None or fc1 is None or pos is None:
        raise CheckpointError(
            f"the SigLIP vision tower is missing ({VISION}embeddings.patch_embedding.weight, "
            "position_embedding, encoder.layers.0.mlp.fc1)"
        )
    width, depth, mlp, patch_size = patch[0], _depth(shapes, VISION + "encoder."), fc1[0], patch[2]
    image_size = int(round(pos[0] ** 0.5)) * patch_size
    for s in KNOWN_SIGLIP:
        if (s.width, s.depth, s.mlp_dim, s.patch_size, s.image_size) == (
            width,
            depth,
            mlp,
            patch_size,
            image_size,
        ):
            return s
    raise CheckpointError(
        f"unknown SigLIP shape: width {width}, {depth} layers, mlp {mlp}, patch {patch_size}, "
        f"image {image_size} (key {VISION}embeddings.patch_embedding.weight); known: So400m/14 and "
        "the tiny test tower"
    )


def config_from_checkpoint(
    shapes: dict, config_json: dict | None = None, pi05: bool | None = None
) -> PolicyConfig:
    """A PolicyConfig for openpi-named `shapes` ({key: shape}); `config_json` is openpi's or LeRobot's
    config.json."""
    cj = dict(config_json or {})
    if pi05 is None:
        kind = cj.get("type")
        pi05 = kind == "pi05" if kind in ("pi0", "pi05") else detect_pi05(shapes)
    llm_name = _pick_variant(cj.get("paligemma_variant"), shapes, LLM, "PaliGemma language model")
    expert_name = _pick_variant(cj.get("action_expert_variant"), shapes, EXPERT, "action expert")
    vision = _siglip_from_shapes(shapes)
    embed = shapes.get(TIED[1]) or shapes.get(TIED[0])
    if embed is None:
        raise CheckpointError(f"no {TIED[1]} (nor {TIED[0]}) in the checkpoint")
    in_proj = shapes.get("action_in_proj.weight")
    if in_proj is None:
        raise CheckpointError("no action_in_proj.weight in the checkpoint")
    action_dim = in_proj[1]
    declared = cj.get("action_dim", cj.get("max_action_dim"))
    if declared is not None and int(declared) != action_dim:
        raise CheckpointError(
            f"config.json says action_dim {declared} but action_in_proj.weight has shape {in_proj}"
        )
    horizon = int(cj.get("action_horizon", cj.get("chunk_size", 50)))
    max_len = int(cj.get("max_token_len", cj.get("tokenizer_max_length", DEFAULT_MAX_TOKEN_LEN[pi05])))
    steps = int(cj.get("num_steps", cj.get("num_inference_steps", 10)))
    llm_variant = llm_name
    if GEMMA_VARIANTS[llm_name].vocab_size != embed[0]:
        # our tiny variants use a small vocabulary; openpi's use PaliGemma's 257152 tokens
        matches = [
            n
            for n, g in GEMMA_VARIANTS.items()
            if g.vocab_size == embed[0]
            and (g.width, g.depth, g.mlp_dim)
            == (
                GEMMA_VARIANTS[llm_name].width,
                GEMMA_VARIANTS[llm_name].depth,
                GEMMA_VARIANTS[llm_name].mlp_dim,
            )
        ]
        if not matches:
            raise CheckpointError(
                f"{TIED[1]} has {embed[0]} rows but variant {llm_name!r} has a vocabulary of "
                f"{GEMMA_VARIANTS[llm_name].vocab_size}"
            )
        llm_variant = matches[0]
    name = _builtin_name(pi05, llm_variant, expert_name, vision, action_dim)
    try:
        return PolicyConfig(
            name=name,
            pi05=pi05,
            paligemma_variant=llm_variant,
            action_expert_variant=expert_name,
            vision=vision,
            action_dim=action_dim,
            action_horizon=horizon,
            max_token_len=max_len,
            num_steps=steps,
            discrete_state_input=bool(cj.get("discrete_state_input", False)),
        )
    except ValueError as err:
        raise CheckpointError(f"the checkpoint's variants do not fit together: {err}") from err


def _builtin_name(pi05, llm, expert, vision, action_dim) -> str:
    for name, c in CONFIGS.items():
        if (c.pi05, c.paligemma_variant, c.action_expert_variant, c.vision, c.action_dim) == (
                pi05, llm, expert, vision, action_dim):
            return name
    return f"{'pi05' if pi05 else 'pi0'}[{llm}+{expert}]"


# ---- directories -------------------------------------------------------------------------------------------

def find_norm_stats(directory: str | os.PathLike, asset_id: str | None = None) -> Path | None:
    """openpi: assets/<asset_id>/norm_stats.json (the only one if asset_id is None); LeRobot: the
    preprocessor's normalizer safetensors."""
    d = Path(directory)
    if asset_id is not None:
        p = d / "assets" / asset_id / "norm_stats.json"
        return p if p.exists() else None
    default = d / "assets" / DEFAULT_ASSET_ID / "norm_stats.json"
    if default.exists():
        return default
    found = sorted((d / "assets").glob("**/norm_stats.json")) if (d / "assets").is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        ids = [str(p.parent.relative_to(d / "assets")) for p in found]
        raise CheckpointError(f"{d}/assets holds norm stats for several asset ids {ids}; pass the asset id "
                              "(--asset-id) or the file (--norm-stats)")
    lerobot = sorted(d.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    if lerobot:
        return lerobot[0]
    return None


def inspect_checkpoint(path: str | os.PathLike, asset_id: str | None = None) -> CheckpointInfo:
    p = Path(path)
    weights = p / "model.safetensors" if p.is_dir() else p
    if not weights.exists():
        raise FileNotFoundError(f"no checkpoint at {weights}; pass a directory holding model.safetensors "
                                "(openpi or LeRobot layout)")
    directory = weights.parent
    raw = read_shapes(weights)
    fmt = detect_format(raw)
    cfg_file = directory / "config.json"
    config_json = {}
    if cfg_file.exists():
        try:
            config_json = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg_file} is not valid JSON ({err})") from err
    kind = config_json.get("type")
    pi05 = kind == "pi05" if kind in ("pi0", "pi05") else detect_pi05(raw)
    shapes = to_openpi_keys(raw, pi05)
    config = config_from_checkpoint(shapes, config_json, pi05=pi05)
    return CheckpointInfo(path=directory, weights=weights, format=fmt, pi05=pi05, config=config,
                          config_json=config_json, norm_stats=find_norm_stats(directory, asset_id))


def load_checkpoint_with_info(path, config: str | PolicyConfig | None = None, device="cpu",
                              dtype: torch.dtype = torch.float32, asset_id: str | None = None
                              ) -> tuple[PI0Policy, CheckpointInfo]:
    """The policy and what its directory says (layout, norm stats). Users call `duquant.models.load_policy`,
    which comes here for LeRobot's layout; the server calls this for the norm stats."""
    info = inspect_checkpoint(path, asset_id=asset_id)
    cfg = info.config
    if config is not None:
        given = CONFIGS[config] if isinstance(config, str) and config in CONFIGS else config
        if isinstance(given, str):
            raise CheckpointError(f"unknown config {given!r}; choose one of {list(CONFIGS)} or leave it out "
                                  "(the checkpoint's own config is detected)")
        if (given.pi05, given.llm, given.expert, given.vision, given.action_dim) != (
                cfg.pi05, cfg.llm, cfg.expert, cfg.vision, cfg.action_dim):
            raise CheckpointError(f"config {given.name!r} does not match the checkpoint ({info.describe()})")
        cfg = replace(given, action_horizon=cfg.action_horizon)
        info.config = cfg
    try:
        tensors = load_file(str(info.weights))
    except Exception as err:
        raise CheckpointError(
            f"{info.weights} could not be read ({err}); it may be truncated or corrupt"
        ) from err
    tensors = to_openpi_keys(tensors, info.pi05)
    model = build_policy(cfg, device="meta", dtype=dtype)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{info.format} checkpoint {info.weights} does not match {cfg.name!r}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}"
        )
    bad = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"{len(bad)} tensor(s) have the wrong shape, e.g. {bad[0][0]}: {bad[0][1]} in the file, "
            f"{bad[0][2]} expected for {cfg.name!r}"
        )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    pg = model.paligemma_with_expert.paligemma
    pg.lm_head.weight = pg.model.language_model.embed_tokens.weight  # re-tie after assign
    return model.to(device).eval(), info


# ---- writing (tests, conversions) --------------------------------------------------------------------------

def save_openpi_checkpoint(model: PI0Policy, directory: str | os.PathLike, norm_stats: dict | None = None,
                           asset_id: str = DEFAULT_ASSET_ID) -> Path:
    """openpi's layout: model.safetensors (tied pair once), config.json, assets/<asset_id>/norm_stats.json.
    `norm_stats`: {"state": {"mean": [...], ...}, "actions": {...}} (lists or arrays)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(model, str(d / "model.safetensors"))
    cfg = model.config
    (d / "config.json").write_text(json.dumps({
        "action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
        "paligemma_variant": cfg.paligemma_variant, "action_expert_variant": cfg.action_expert_variant,
        "precision": str(model.dtype).replace("torch.", "")}, indent=2))
    if norm_stats is not None:
        p = d / "assets" / asset_id / "norm_stats.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"norm_stats": _jsonable(norm_stats)}, indent=2))
    return d


def save_lerobot_checkpoint(
    model: PI0Policy, directory: str | os.PathLike, norm_stats: dict | None = None
) -> Path:
    """LeRobot's layout: "model."-prefixed keys with the embedding stored once under lm_head (as LeRobot's
    pi0.5 loader expects), config.json with "type", and the normalizer safetensors of the preprocessor."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {LEROBOT_PREFIX + k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
          if k != TIED[1]}
    save_file(sd, str(d / "model.safetensors"))
    cfg = model.config
    (d / "config.json").write_text(
        json.dumps(
            {
                "type": "pi05" if cfg.pi05 else "pi0",
                "paligemma_variant": cfg.paligemma_variant,
                "action_expert_variant": cfg.action_expert_variant,
                "chunk_size": cfg.action_horizon,
                "n_action_steps": cfg.action_horizon,
                "max_action_dim": cfg.action_dim,
                "max_state_dim": cfg.action_dim,
                "tokenizer_max_length": cfg.max_token_len,
                "num_inference_steps": cfg.num_steps,
                "dtype": str(model.dtype).replace("torch.", ""),
            },
            indent=2,
        )
    )
    if norm_stats is not None:
        names = {"state": "observation.state", "actions": "action"}
        flat = {f"{names[key]}.{stat}": torch.as_tensor(value, dtype=torch.float32)
                for key, stats in norm_stats.items() for stat, value in stats.items() if value is not None}
        save_file(flat, str(d / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    return d


def _jsonable(stats: dict) -> dict:
    return {
        k: {
            s: [float(x) for x in torch.as_tensor(v).flatten().tolist()]
            for s, v in st.items()
            if v is not None
        }
        for k, st in stats.items()
    }


__all__ = [
    "CheckpointInfo",
    "inspect_checkpoint",
    "load_checkpoint_with_info",
    "to_openpi_keys",
    "config_from_checkpoint",
    "detect_pi05",
    "detect_format",
    "find_norm_stats",
    "save_openpi_checkpoint",
    "save_lerobot_checkpoint",
    "OPENPI",
    "LEROBOT",
    "DEFAULT_ASSET_ID",
]
