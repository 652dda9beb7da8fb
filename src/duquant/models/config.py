"""Model configs: the Gemma variants openpi defines, SigLIP So400m/14, and the policy configs by name.

Where each number comes from (openpi @ 15a9616):
- Gemma variants: `src/openpi/models/gemma.py::get_config` (dummy, gemma_300m, gemma_300m_lora, gemma_2b,
  gemma_2b_lora). The LoRA forms have the same shapes (their adapters only exist at training time).
- Vocabulary 257152: `gemma.py::PALIGEMMA_VOCAB_SIZE`, also hard-coded in `gemma_pytorch.py` for both towers.
- SigLIP So400m/14: `src/openpi/models/siglip.py` (width 1152, depth 27, mlp 4304, 16 heads) with
  `variant="So400m/14", pool_type="none"` in `pi0.py`; the PyTorch port builds transformers' PaliGemma vision
  config with intermediate_size 4304 and no pooling head. LayerNorm eps 1e-6, RMSNorm eps 1e-6, RoPE theta 1e4.
- Policy: `src/openpi/models/pi0_config.py::Pi0Config` (action_dim 32, action_horizon 50, max_token_len 48 for
  pi0 and 200 for pi0.5); 10 Euler steps is `sample_actions`' default; image keys and 224x224 from `model.py`.

The `*-tiny` configs keep every module name and the structure (joint prefix/expert attention, 1 KV head, GeGLU,
adaRMS, a SigLIP MLP width that is not a multiple of 128, like 4304) at sizes where a CPU samples a batch of 4 in
well under a second: 4 Gemma layers (not 18), 3 SigLIP layers (not 27), and 28-pixel patches so a 224x224 image
gives 64 tokens (not 256). Inputs are the same as full size: 224x224 images, 32-dim state/actions, horizon 50.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PALIGEMMA_VOCAB_SIZE = 257_152
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi model.py IMAGE_KEYS


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    rms_eps: float = 1e-6
    rope_theta: float = 10_000.0


GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    # ours (not in openpi), for tests, demos and the built-in report; vocabulary 512 (the fallback tokenizer's)
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
SIGLIP_TINY = SiglipConfig(width=128, depth=3, mlp_dim=344, num_heads=4, patch_size=28)


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
    # openpi's Pi0Config defaults this to `pi05`; we default to False, as pi05_libero (our target) sets it. The model
    # never reads it: the prompt tokenizer does (duquant.models.tokenizer, the server's preprocessing).
    discrete_state_input: bool = False

    @property
    def llm(self) -> GemmaConfig:
        return GEMMA_VARIANTS[self.paligemma_variant]

    @property
    def expert(self) -> GemmaConfig:
        return GEMMA_VARIANTS[self.action_expert_variant]

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def __post_init__(self) -> None:
        for v in (self.paligemma_variant, self.action_expert_variant):
            if v not in GEMMA_VARIANTS:
                raise ValueError(f"unknown Gemma variant {v!r}; choose one of {sorted(GEMMA_VARIANTS)}")
        llm, exp = self.llm, self.expert
        if (llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.depth) != (
                exp.num_heads, exp.num_kv_heads, exp.head_dim, exp.depth):
            raise ValueError("the language model and the action expert must share depth, heads, KV heads and head "
                             "dim (their attention is joint, layer by layer)")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"image size {self.vision.image_size} is not a multiple of the patch size")


CONFIGS: dict[str, PolicyConfig] = {
    "pi0": PolicyConfig("pi0"),
    "pi05": PolicyConfig("pi05", pi05=True, max_token_len=200),
    "pi0-tiny": PolicyConfig("pi0-tiny", paligemma_variant="gemma_tiny", action_expert_variant="gemma_tiny_expert",
                             vision=SIGLIP_TINY),
    "pi05-tiny": PolicyConfig("pi05-tiny", pi05=True, paligemma_variant="gemma_tiny",
                              action_expert_variant="gemma_tiny_expert", vision=SIGLIP_TINY, max_token_len=48),
}
CONFIG_NAMES = tuple(CONFIGS)


def get_config(name: str | PolicyConfig, **overrides) -> PolicyConfig:
    """A config by name (`pi0`, `pi05`, `pi0-tiny`, `pi05-tiny`), with optional field overrides
    (e.g. `action_horizon=10` as in openpi's pi05_libero)."""
    if isinstance(name, PolicyConfig):
        cfg = name
    elif name in CONFIGS:
        cfg = CONFIGS[name]
    else:
        raise ValueError(f"unknown policy config {name!r}; choose one of {list(CONFIGS)}")
    return replace(cfg, **overrides) if overrides else cfg
