"""pi0 / pi0.5 policies in plain PyTorch with openpi's module names and checkpoint keys (see docs/models.md).

    from duquant.models import build_policy, count_linear_by_part, make_synthetic_observation
    model = build_policy("pi0-tiny")          # or load_policy("/ckpt"), or build_policy("pi05", device="meta")
    obs = make_synthetic_observation(model.config, batch_size=4, seed=0)
    actions = model.sample_actions(obs)       # (4, 50, 32) float32

This package never imports duquant's quantization code (the engine is a client of the model, not the reverse).
"""

from torch import nn

from duquant.models.config import (
    CONFIG_NAMES,
    CONFIGS,
    GEMMA_VARIANTS,
    IMAGE_KEYS,
    GemmaConfig,
    PolicyConfig,
    SiglipConfig,
    get_config,
)
from duquant.models.loading import (
    CheckpointError,
    build_policy,
    detect_config,
    load_policy,
    read_checkpoint_keys,
    save_policy,
    to_openpi_precision,
)
from duquant.models.observation import (
    Observation,
    load_observations,
    make_synthetic_observation,
    normalize_image,
    preprocess_observation,
    resize_with_pad,
    save_observations,
)
from duquant.models.pi0 import PI0Policy, make_att_2d_masks
from duquant.models.tokenizer import FallbackTokenizer, PaligemmaTokenizer, load_tokenizer

PART_PREFIXES = {
    "llm": "paligemma_with_expert.paligemma.model.language_model.",
    "dit": "paligemma_with_expert.gemma_expert.model.",
    "vision": "paligemma_with_expert.paligemma.model.vision_tower.",
}


def part_of(name: str) -> str:
    """"llm" / "dit" / "vision" for a Linear inside a transformer block of that part (q/k/v/o, MLP; SigLIP's
    q/k/v/out_proj, fc1/fc2), "other" for everything else (heads, projector, lm_heads, adaRMS `dense`)."""
    for part, prefix in PART_PREFIXES.items():
        if name.startswith(prefix) and ".layers." in name and not name.endswith(".dense"):
            return part
    return "other"


def count_linear_by_part(model: nn.Module) -> dict[str, int]:
    """nn.Linear count per part: full pi0 / pi0.5 give llm 126, dit 126, vision 162."""
    counts = dict.fromkeys((*PART_PREFIXES, "other"), 0)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            counts[part_of(name)] += 1
    return counts


__all__ = ["build_policy", "load_policy", "save_policy", "to_openpi_precision", "read_checkpoint_keys",
           "detect_config", "CheckpointError", "PolicyConfig", "GemmaConfig", "SiglipConfig", "get_config",
           "CONFIGS", "CONFIG_NAMES", "GEMMA_VARIANTS", "IMAGE_KEYS", "Observation", "make_synthetic_observation",
           "preprocess_observation", "save_observations", "load_observations", "resize_with_pad", "normalize_image",
           "PART_PREFIXES", "part_of", "count_linear_by_part", "load_tokenizer", "PaligemmaTokenizer",
           "FallbackTokenizer", "PI0Policy", "make_att_2d_masks"]
