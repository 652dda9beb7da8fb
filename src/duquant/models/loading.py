"""Build, load and save policies.

    build_policy("pi0", device="meta")               # full size, shapes only: nothing allocated
    build_policy("pi0-tiny")                         # seeded random weights with realistic outliers
    load_policy("/ckpt/pi05_libero_pytorch", dtype=torch.bfloat16)   # openpi's or LeRobot's checkpoint directory
    save_policy(model, "/out")                       # model.safetensors + config.json, as openpi writes them

Checkpoints use openpi's PyTorch key names (`safetensors.torch.save_model(PI0Pytorch)`), which store the tied pair
`paligemma.lm_head.weight` / `language_model.embed_tokens.weight` once; loading restores whichever is missing.
`load_policy` is the one public loader: LeRobot's layout (every key prefixed with `model.`, its own config.json)
is recognised from the keys and read by `duquant.models.checkpoints`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from duquant.models.config import CONFIGS, GEMMA_VARIANTS, SIGLIP_SO400M, SIGLIP_TINY, PolicyConfig, get_config
from duquant.models.pi0 import PI0Policy

TIED = ("paligemma_with_expert.paligemma.lm_head.weight",
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "fc2")
_PI0_ONLY = ("state_proj.", "action_time_mlp_in.", "action_time_mlp_out.")
_PI05_ONLY = ("time_mlp_in.", "time_mlp_out.")
_KEEP_FP32 = ("vision_tower.vision_model.embeddings.patch_embedding.", "vision_tower.vision_model.embeddings."
              "position_embedding.", "input_layernorm", "post_attention_layernorm", "model.norm")


class CheckpointError(ValueError):
    """A checkpoint does not match the model or cannot be read; the message says which keys and the likely cause."""


# ---- build -------------------------------------------------------------------------------------------------------

def _init_weights(model: PI0Policy) -> None:
    """Seeded initialisation with sane activation scales: Gaussian weights with std 1/sqrt(fan_in), residual
    outputs scaled down by sqrt(2 * depth), unit norm gains, adaRMS at (scale, shift, gate) = (0, 0, 1) plus a
    small time dependence."""
    depth = max(model.config.llm.depth, model.config.vision.depth)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            std = m.in_features ** -0.5
            if name.endswith(_OUTPUT_PROJECTIONS):
                std /= (2 * depth) ** 0.5
            if name.endswith(".dense"):
                std = 0.1 * m.in_features ** -0.5
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if name.endswith(".dense"):
                nn.init.ones_(m.bias[2 * m.out_features // 3:])  # gate = 1: residual branches open
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, m.embedding_dim ** -0.5)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** -0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    pos = model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_embedding
    nn.init.normal_(pos.weight, 0.0, 0.1)  # (Gemma RMSNorm weights stay 0: their gain is 1 + weight)


def build_policy(name: str | PolicyConfig = "pi0-tiny", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, realistic: bool | None = None) -> PI0Policy:
    """A policy with seeded random weights, in eval mode. On device "meta" nothing is allocated (shapes only).
    `realistic` (default: True for `*-tiny` configs) injects trained-model-like outlier channels
    (duquant.models.synthetic)."""
    cfg = get_config(name)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return PI0Policy(cfg).to(dtype).eval()
    build_device = device if torch.device(device).type == "cuda" else "cpu"  # full size: initialise on the GPU
    with torch.random.fork_rng(devices=[]), torch.device(build_device):
        torch.manual_seed(seed)
        model = PI0Policy(cfg)
        _init_weights(model)
        if cfg.name.endswith("-tiny") if realistic is None else realistic:
            from duquant.models.synthetic import add_outliers

            add_outliers(model, seed=seed)
    return model.to(device=device, dtype=dtype).eval()


def to_openpi_precision(model: PI0Policy) -> PI0Policy:
    """openpi's bf16 inference recipe, in place: PaliGemma + expert in bfloat16 except the patch and position
    embeddings and every Gemma norm (adaRMS `dense` included), which stay float32 (`to_bfloat16_for_selected_params`);
    the policy heads (action/state/time projections) stay float32, as PI0Pytorch builds them."""
    pwe = model.paligemma_with_expert
    pwe.to(torch.bfloat16)
    for name, p in pwe.named_parameters():
        if any(s in name for s in _KEEP_FP32):
            p.data = p.data.float()
    for name, m in model.named_children():
        if name != "paligemma_with_expert":
            m.float()
    return model


# ---- read --------------------------------------------------------------------------------------------------------

def _checkpoint_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}; pass a directory holding model.safetensors or the file itself")
    return p


def read_checkpoint_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a safetensors header, without reading the tensors."""
    file = _checkpoint_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); it is "
                              "truncated or corrupt - copy or re-export it (openpi: "
                              "examples/convert_jax_model_to_pytorch.py)") from err


def _is_pi05(keys) -> bool | None:
    if any(k.startswith(_PI05_ONLY) or (".layers." in k and ".input_layernorm.dense." in k) for k in keys):
        return True
    if any(k.startswith(_PI0_ONLY) for k in keys):
        return False
    return None


def detect_config(keys: dict[str, tuple[int, ...]], config_json: dict | None = None) -> PolicyConfig:
    """pi0 vs pi0.5 from the keys, sizes from the shapes, horizon and variants from openpi's config.json."""
    cj = config_json or {}
    pi05 = _is_pi05(keys)
    embed = keys.get(TIED[1]) or keys.get(TIED[0])
    if pi05 is None or embed is None:
        prefix = " - the keys carry a 'model.' prefix (LeRobot layout): load it with duquant.models.load_policy" \
            if all(k.startswith("model.") for k in keys) else ""
        raise CheckpointError(f"cannot recognise a pi0 / pi0.5 checkpoint (no {TIED[1]} or no state_proj / "
                              f"time_mlp_in); keys start with {sorted(keys)[:3]}{prefix}")
    gate = keys.get("paligemma_with_expert.gemma_expert.model.layers.0.mlp.gate_proj.weight", (0, 0))
    llm_name = next((n for n, g in GEMMA_VARIANTS.items() if (g.vocab_size, g.width) == tuple(embed)), None)
    expert_name = next((n for n, g in GEMMA_VARIANTS.items() if (g.mlp_dim, g.width) == tuple(gate)), None)
    llm_name, expert_name = cj.get("paligemma_variant", llm_name), cj.get("action_expert_variant", expert_name)
    if llm_name not in GEMMA_VARIANTS or expert_name not in GEMMA_VARIANTS:
        raise CheckpointError(f"no Gemma variant has a {embed[1]}-wide language model with a vocabulary of "
                              f"{embed[0]} and a {gate[1]}-wide expert; pass config=")
    patch = keys.get("paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding"
                     ".weight", (0, 0, 0, 0))
    vision = SIGLIP_TINY if (patch[0], patch[2]) == (SIGLIP_TINY.width, SIGLIP_TINY.patch_size) else SIGLIP_SO400M
    base = next((c for c in CONFIGS.values() if (c.pi05, c.paligemma_variant, c.action_expert_variant, c.vision)
                 == (pi05, llm_name, expert_name, vision)), None)
    action_dim = keys.get("action_in_proj.weight", (0, 32))[1]
    fields = {"pi05": pi05, "paligemma_variant": llm_name, "action_expert_variant": expert_name, "vision": vision,
              "action_dim": action_dim, "action_horizon": int(cj.get("action_horizon", 50)),
              "max_token_len": int(cj.get("max_token_len", base.max_token_len if base else (200 if pi05 else 48)))}
    if base is not None:
        return get_config(base, **{k: v for k, v in fields.items() if getattr(base, k) != v})
    return PolicyConfig(name=f"{'pi05' if pi05 else 'pi0'}-{llm_name}-{expert_name}", **fields)


def _likely_cause(missing: list[str], unexpected: list[str], cfg: PolicyConfig) -> str:
    if unexpected and all(k.startswith("model.") for k in unexpected):
        stripped = {k[len("model."):] for k in unexpected}
        if stripped & set(missing):
            return ("every key carries a leading 'model.' (LeRobot's layout): load the directory with "
                    "duquant.models.load_policy(dir) and no config, or strip the prefix")
    miss, unexp = set(missing), set(unexpected)
    for m in missing[:1]:
        for u in unexpected:
            if u != m and u.endswith("." + m):  # the file has an extra prefix
                pre = u[: len(u) - len(m)]
                if sum(k.startswith(pre) and k[len(pre):] in miss for k in unexp) * 2 >= len(unexp):
                    return f"the checkpoint's keys carry an extra prefix {pre!r}: strip it"
            if u != m and m.endswith("." + u):  # the file lacks a prefix
                pre = m[: len(m) - len(u)]
                if sum(pre + k in miss for k in unexp) * 2 >= len(unexp):
                    return f"the checkpoint's keys lack the prefix {pre!r}"
    file_pi05 = _is_pi05(unexpected)  # what the keys the model does not know say about the file
    if cfg.pi05 and file_pi05 is False:
        return "this looks like a pi0 checkpoint loaded into a pi0.5 config (pass config='pi0' or leave config=None)"
    if not cfg.pi05 and file_pi05:
        return "this looks like a pi0.5 checkpoint loaded into a pi0 config (pass config='pi05' or leave config=None)"
    if missing + unexpected and all(".layers." in k for k in missing + unexpected):
        return "the number of layers differs (another size variant?)"
    return "the checkpoint was written for another model or variant"


def load_policy(path: str | os.PathLike, config: str | PolicyConfig | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                strict: bool = True, asset_id: str | None = None) -> PI0Policy:
    """Load a pi0 / pi0.5 checkpoint into our policy, cast to `dtype`, in eval mode: openpi's PyTorch layout
    (`model.safetensors` + optional config.json; a file or the directory holding it) or LeRobot's (`model.`-prefixed
    keys, LeRobot's config.json), told apart by the keys. `config=None` detects pi0 / pi0.5 and the sizes. Strict by
    default: any missing or unexpected key raises CheckpointError listing the first offenders and the likely cause;
    strict=False (openpi layout only) keeps the seeded initialisation for missing keys. `asset_id` picks the
    norm-stats asset when a LeRobot directory holds several (see `checkpoints.inspect_checkpoint`)."""
    file = _checkpoint_file(path)
    keys = read_checkpoint_keys(file)
    from duquant.models.checkpoints import LEROBOT, detect_format, load_checkpoint_with_info  # builds on this module

    if detect_format(keys) == LEROBOT:
        return load_checkpoint_with_info(file, config=config, device=device, dtype=dtype, asset_id=asset_id)[0]
    cj_path = file.parent / "config.json"
    try:
        cj = json.loads(cj_path.read_text()) if cj_path.exists() else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cj_path} is not valid JSON ({err})") from err
    cfg = detect_config(keys, cj) if config is None else get_config(config)
    try:
        tensors = load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file} could not be read ({type(err).__name__}: {err}); it is truncated or "
                              "corrupt") from err
    for a, b in (TIED, TIED[::-1]):  # restore whichever of the tied pair save_model dropped
        if a not in tensors and b in tensors:
            tensors[a] = tensors[b]
    model = build_policy(cfg, device="meta" if strict else "cpu", dtype=dtype, realistic=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {file} does not match config {cfg.name!r}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}; likely cause: "
            f"{_likely_cause(missing, unexpected, cfg)}")
    bad_shapes = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if bad_shapes:
        k, got, want = bad_shapes[0]
        raise CheckpointError(f"{len(bad_shapes)} tensor(s) have the wrong shape, e.g. {k}: {got} in the file, "
                              f"{want} in config {cfg.name!r}; pass the matching config (or config=None)")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k in expected}
    model.load_state_dict(state, strict=strict, assign=strict)
    pg = model.paligemma_with_expert.paligemma
    pg.lm_head.weight = pg.model.language_model.embed_tokens.weight  # re-tie (assign replaced both)
    return model.to(device).eval()


# ---- write -------------------------------------------------------------------------------------------------------

def save_policy(model: PI0Policy, directory: str | os.PathLike) -> Path:
    """Write `model.safetensors` (tied weights stored once, as openpi's save_model does: the lm_head name is kept)
    and `config.json` with openpi's fields (action_dim, action_horizon, paligemma_variant, action_expert_variant,
    precision) plus ours (pi05, max_token_len, duquant_config). Atomic per file. Returns the weights' path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, directory / "model.safetensors")
    cfg = model.config
    meta = {"action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
            "paligemma_variant": cfg.paligemma_variant, "action_expert_variant": cfg.action_expert_variant,
            "precision": str(model.dtype).replace("torch.", ""), "pi05": cfg.pi05,
            "max_token_len": cfg.max_token_len, "duquant_config": cfg.name}
    tmp_json = directory / ".config.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, directory / "config.json")
    return directory / "model.safetensors"
