"""pi0 / pi0.5 policies in plain PyTorch with openpi's module names and checkpoint keys.

This package never imports duquant's quantization code (the engine is a client of the model, not the reverse).
"""

from torch import nn

from duquant.models.config import CONFIG_NAMES, CONFIGS, GEMMA_VARIANTS, PolicyConfig, get_config
from duquant.models.loading import CheckpointError, build_policy, load_policy, save_policy
from duquant.models.observation import (
    Observation,
    load_observations,
    make_synthetic_observation,
    normalize_image,
    resize_with_pad,
    save_observations,
)
from duquant.models.pi0 import PI0Policy
from duquant.models.tokenizer import load_tokenizer

PART_PREFIXES = {
    "llm": "paligemma_with_expert.paligemma.model.language_model.",
    "dit": "paligemma_with_expert.gemma_expert.model.",
    "vision": "paligemma_with_expert.paligemma.model.vision_tower.",
}


def count_linear_by_part(model: nn.Module) -> dict[str, int]:
    """nn.Linear layers inside the transformer blocks of each part (heads, projections and adaRMS `dense` layers
    are counted under "other")."""
    counts = dict.fromkeys((*PART_PREFIXES, "other"), 0)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        part = next((p for p, pre in PART_PREFIXES.items() if name.startswith(pre) and ".layers." in name
                     and not name.endswith(".dense")), "other")
        counts[part] += 1
    return counts


__all__ = ["build_policy", "load_policy", "save_policy", "PolicyConfig", "get_config", "CONFIGS", "CONFIG_NAMES",
           "GEMMA_VARIANTS", "Observation", "make_synthetic_observation", "save_observations", "load_observations",
           "resize_with_pad", "normalize_image", "PART_PREFIXES", "count_linear_by_part", "load_tokenizer",
           "PI0Policy", "CheckpointError"]
