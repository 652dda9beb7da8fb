"""Model configs: the Gemma variants openpi defines, SigLIP So400m/14, and the policy configs by name.

Numbers follow openpi (`src/openpi/models/gemma.py::get_config`, `pi0_config.py`, `siglip.py`). The `*-tiny`
configs keep every module name and the structure (joint prefix/expert attention, 1 KV head, GeGLU, SigLIP with a
last MLP width that is not a multiple of 128, like 4304) at widths a CPU runs in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 257_152
    rms_eps: float = 1e-6
    rope_theta: float = 10_000.0


# openpi gemma.get_config: the LoRA variants have the same shapes (LoRA adapters are merged into the weights).
GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    # ours, for tests and the built-in report
    "gemma_tiny": GemmaConfig(width=256, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=64,
                              vocab_size=512),
    "gemma_tiny_expert": GemmaConfig(width=128, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=64,
                                     vocab_size=512),
}
GEMMA_VARIANTS["gemma_2b_lora"] = GEMMA_VARIANTS["gemma_2b"]
GEMMA_VARIANTS["gemma_300m_lora"] = GEMMA_VARIANTS["gemma_300m"]


@dataclass(frozen=True)
class SiglipConfig:
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    ln_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SIGLIP_SO400M = SiglipConfig()
SIGLIP_TINY = SiglipConfig(width=128, depth=3, mlp_dim=344, num_heads=4)

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    pi05: bool = False
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    vision: SiglipConfig = SIGLIP_SO400M
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48
    num_steps: int = 10
    image_keys: tuple[str, ...] = field(default=IMAGE_KEYS)
    discrete_state_input: bool = False  # pi0.5 puts the discretised state in the prompt (pi05_libero: off)

    @property
    def llm(self) -> GemmaConfig:
        return GEMMA_VARIANTS[self.paligemma_variant]

    @property
    def expert(self) -> GemmaConfig:
        return GEMMA_VARIANTS[self.action_expert_variant]

    def __post_init__(self) -> None:
        for v in (self.paligemma_variant, self.action_expert_variant):
            if v not in GEMMA_VARIANTS:
                raise ValueError(f"unknown Gemma variant {v!r}; openpi defines {sorted(GEMMA_VARIANTS)}")
        llm, exp = self.llm, self.expert
        if (llm.num_heads, llm.num_kv_heads, llm.head_dim) != (exp.num_heads, exp.num_kv_heads, exp.head_dim):
            raise ValueError("the language model and the action expert must share heads, KV heads and head dim "
                             "(their attention is joint)")


CONFIGS: dict[str, PolicyConfig] = {
    "pi0": PolicyConfig("pi0"),
    "pi05": PolicyConfig("pi05", pi05=True, max_token_len=200),
    "pi0-tiny": PolicyConfig("pi0-tiny", paligemma_variant="gemma_tiny", action_expert_variant="gemma_tiny_expert",
                             vision=SIGLIP_TINY),
    "pi05-tiny": PolicyConfig("pi05-tiny", pi05=True, paligemma_variant="gemma_tiny",
                              action_expert_variant="gemma_tiny_expert", vision=SIGLIP_TINY, max_token_len=48),
}
CONFIG_NAMES = tuple(CONFIGS)


def get_config(name: str, **overrides) -> PolicyConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown policy config {name!r}; choose one of {list(CONFIGS)}")
    cfg = CONFIGS[name]
    return replace(cfg, **overrides) if overrides else cfg
