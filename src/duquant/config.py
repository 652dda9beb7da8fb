"""DuQuantConfig: every knob of the engine, from Python, CLI flags or ``OPENPI_DUQUANT_*`` variables.

Precedence is Python/CLI over environment over defaults. Every value is validated when the config is built,
and every error names the variable (or field) and the fix. The environment names are those of the openpi
DuQuant scripts (``OPENPI_DUQUANT_SCOPE``, ``_INCLUDE``, ``_BLOCK``, ...), so existing scripts keep working.

This module is torch-free on purpose: the LIBERO client and the report schema import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from duquant import registry

ENV_PREFIX = "OPENPI_DUQUANT_"

# Linear layers inside transformer blocks; `out_proj` is SigLIP's attention output.
DEFAULT_INCLUDE = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj).*"
# Embedding / head / conditioning layers stay in float unless asked for. `action_out_proj` contains `out_proj`,
# which is why it must be excluded by name (INCLUDE_ACTION_HEAD=1 lifts that).
HEAD_LAYERS = ("lm_head", "multi_modal_projector", "action_in_proj", "action_out_proj", "state_proj",
               "action_time_mlp_in", "action_time_mlp_out", "time_mlp_in", "time_mlp_out")
ACTION_HEAD_LAYERS = ("action_in_proj", "action_out_proj")
NORM_LAYERS = ("norm", "ln", "layernorm", "emb", "embed_tokens", "dense")


def default_exclude(include_action_head: bool = False) -> str:
    heads = [h for h in HEAD_LAYERS if not (include_action_head and h in ACTION_HEAD_LAYERS)]
    return r"(?:^|\.)(" + "|".join(heads) + r")(?:\.|$)" + r"|(?:^|\.)(?:norm|ln|layernorm|emb)(?:\.|$)" + \
        r"|_layernorm\.dense$|\.norm\.dense$"


METHODS = tuple(registry.METHODS)  # duquant, smoothquant, hadamard, rtn (duquant/registry.py)
WEIGHT_ROUNDINGS = tuple(registry.ROUNDINGS)  # rtn, gptq
BACKENDS = ("fake", "gpu")
ROW_ROT_VALUES = ("0", "restore", "propagate")
WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (0, 4, 8, 16)  # 0 and 16 mean "activations stay in float"
# The per-token activation clip of the official DuQuant code (`--lac 0.9`), the one default every layer gets
# (`default_act_clip`): applied at <= 4 activation bits; 8-bit activations are not clipped (docs/algorithm.md,
# "Deviation from the official code").
ACT_CLIP = 0.9


def default_act_clip(abits: int) -> float:
    return ACT_CLIP if abits <= 4 else 1.0


def bits_name(wbits: int, abits: int) -> str:
    """The integer format's name for a bits setting: w4a8, w8a8, w4a16 (abits 0 or 16); the formats registry's
    ``name_for_bits``, torch-free."""
    return f"w{int(wbits)}a{16 if abits in (0, 16) else int(abits)}"


@dataclass(frozen=True)
class Preset:
    """A named part of pi0 / pi0.5 and what selecting it must give."""

    name: str
    scope: str
    include: str
    expected: int
    kinds: tuple[str, ...]  # the Linear kinds of one block, in module order
    blocks: int
    description: str


_LLM = "paligemma_with_expert.paligemma.model.language_model."
_DIT = "paligemma_with_expert.gemma_expert.model."
_VISION = "paligemma_with_expert.paligemma.model.vision_tower."
_GEMMA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SIGLIP_KINDS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

PRESETS: dict[str, Preset] = {
    "llm": Preset("llm", _LLM, DEFAULT_INCLUDE, 126, _GEMMA_KINDS, 18, "PaliGemma's Gemma 2B language model"),
    "dit": Preset("dit", _DIT, DEFAULT_INCLUDE, 126, _GEMMA_KINDS, 18, "the Gemma 300M action expert"),
    "vision": Preset("vision", _VISION, DEFAULT_INCLUDE, 162, _SIGLIP_KINDS, 27, "the SigLIP So400m/14 encoder"),
    "llm+dit": Preset("llm+dit", "paligemma_with_expert.",
                      r".*(language_model|gemma_expert)\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*",
                      252, _GEMMA_KINDS, 36, "language model and action expert"),
    "full": Preset("full", "", DEFAULT_INCLUDE, 414, (), 0, "vision + language model + action expert"),
}
PART_SCOPES = {"llm": _LLM, "dit": _DIT, "vision": _VISION}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable and the fix."""


@dataclass(frozen=True)
class DuQuantConfig:
    """How to quantize. Defaults are the DuQuant paper's W4A8 (block 128, 256 greedy steps, alpha 0.6,
    asymmetric per-channel weights with clip 0.8, asymmetric per-token activations with clip 0.9 at <= 4 bits,
    unclipped at 8 bits: see ``default_act_clip``)."""

    method: str = "duquant"
    wbits: int = 4
    abits: int = 8
    scope: str = ""
    include: str = DEFAULT_INCLUDE
    exclude: str | None = None  # None: default_exclude(include_action_head)
    layers: tuple[str, ...] = ()  # explicit whitelist of full names (OPENPI_DUQUANT_LAYERS)
    wbits_overrides: tuple[tuple[str, int], ...] = ()  # (name or regex, bits), OPENPI_DUQUANT_WBITS
    # A registered format name (duquant.formats: w4a8, w4a16, w8a8-fp8, ...); None: the integer format wbits/abits
    # mean. Given, it sets wbits/abits (see `format_name` and docs/formats.md for the precedence).
    format: str | None = None
    format_overrides: tuple[tuple[str, str], ...] = ()  # (name or regex, format), OPENPI_DUQUANT_FORMAT_OVERRIDES
    preset: str | None = None
    block_size: int = 128
    block_out: int | None = None  # accepted for the fork's scripts; used by row_rot="restore"
    permute: str = "zigzag"  # a registered permutation (registry.PERMUTATIONS); True / False mean zigzag / none
    row_rot: str = "0"
    alpha: float | None = None  # smoothing strength (LS); None: 0.6 for duquant, 0.5 for smoothquant
    rotation_steps: int = 256
    # Adam steps refining each duquant group's greedy block rotations on its calibration sample by the quantized
    # output error (duquant.rotation_refine; 0 = off, the greedy transform as it is)
    rotation_refine_steps: int = 0
    # with rotation_refine_steps > 0: also learn the per-channel smoothing vector (as log s, from the greedy one),
    # jointly with the rotations by the same loss (OmniQuant-style learnable equivalent transformation)
    rotation_refine_smooth: bool = False
    w_symmetric: bool = False
    w_clip: float | None = None  # None: 0.8 (paper) for <= 4 bits, 1.0 for 8 bits
    w_group_size: int | None = None
    clip_search: bool = False
    act_symmetric: bool = False
    act_clip: float | None = None  # None: default_act_clip(abits), 0.9 (paper) at <= 4 bits, 1.0 at 8 bits
    act_pct: float | None = None  # percentile clipping of activations, folded into a per-layer clip ratio
    # per group of layers sharing an input: the per-token activation clip (of ACT_CLIP_GRID and the configured one)
    # with the smallest output error of the group's layers on the calibration sample (api.search_act_clip)
    act_clip_search: bool = False
    act_static: bool = False  # one static per-tensor activation scale instead of per-token dynamic
    weight_rounding: str = "rtn"  # rtn | gptq (duquant/rounding/), in the transformed basis
    gptq_damp: float = 0.01  # GPTQ damping, a fraction of the Hessian's mean diagonal
    gptq_act_order: bool = False  # GPTQ visits input columns by decreasing Hessian diagonal
    sequential: bool = False  # calibrate block by block on the outputs of the already-quantized blocks
    calib_steps: int = 32
    calib_tokens: int = 2048  # bounded token sample kept per layer for the greedy search and clip search
    share_transforms: bool = True  # q/k/v and gate/up (layers fed the same tensor) share one transform
    packdir: str | None = None
    backend: str = "fake"
    include_action_head: bool = False
    debug: bool = False
    dryrun: bool = False
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}"
                              f" (OPENPI_DUQUANT_PRESET / --preset)")
        if self.preset is not None and self.scope == "" and self.include == DEFAULT_INCLUDE:
            # DuQuantConfig(preset="llm") means the preset's layers, as --preset does; an explicit scope or include
            # wins over the preset's, as in from_sources.
            p = PRESETS[self.preset]
            object.__setattr__(self, "scope", p.scope)
            object.__setattr__(self, "include", p.include)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {list(METHODS)} (--method)")
        # normalised here, so Python's permute=True / False and every spelling hash and compare as one name
        object.__setattr__(self, "permute", permutation_name("OPENPI_DUQUANT_PERMUTE / --permute", self.permute))
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"unknown weight rounding {self.weight_rounding!r}; choose one of "
                              f"{list(WEIGHT_ROUNDINGS)} (OPENPI_DUQUANT_WEIGHT_ROUNDING / --weight-rounding)")
        if not 0.0 < self.gptq_damp < 10.0:
            raise ConfigError(f"GPTQ damping {self.gptq_damp} must be in (0, 10), typically 0.01 "
                              "(OPENPI_DUQUANT_GPTQ_DAMP / --gptq-damp)")
        if self.wbits not in WEIGHT_BITS:
            raise ConfigError(f"weight bits {self.wbits} not supported; use one of {list(WEIGHT_BITS)}"
                              f" (OPENPI_DUQUANT_WBITS_DEFAULT / --wbits)")
        if self.abits not in ACT_BITS:
            raise ConfigError(f"activation bits {self.abits} not supported; use one of {list(ACT_BITS)}"
                              f" (0 or 16 keeps activations in float) (OPENPI_DUQUANT_ABITS / --abits)")
        for name, bits in self.wbits_overrides:
            if bits not in WEIGHT_BITS:
                raise ConfigError(f"OPENPI_DUQUANT_WBITS: bits {bits} for {name!r} not in {list(WEIGHT_BITS)}")
        if self.format is not None:
            self._sync_bits_to_format()
        for name, fmt in self.format_overrides:
            format_spec(fmt, f"OPENPI_DUQUANT_FORMAT_OVERRIDES / --format-overrides ({name!r})")
        if self.block_size < 2:
            raise ConfigError(f"block size {self.block_size} must be >= 2 (OPENPI_DUQUANT_BLOCK / --block-size)")
        if self.block_out is not None and self.block_out < 2:
            raise ConfigError(f"BLOCK_OUT {self.block_out} must be >= 2 (OPENPI_DUQUANT_BLOCK_OUT)")
        if self.row_rot not in ROW_ROT_VALUES:
            raise ConfigError(f"row rotation {self.row_rot!r} not in {list(ROW_ROT_VALUES)} (OPENPI_DUQUANT_ROW_ROT)")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothing strength {self.alpha} must be in [0, 1] (OPENPI_DUQUANT_LS / --alpha)")
        if self.w_clip is not None and not 0.0 < self.w_clip <= 1.0:
            raise ConfigError(f"weight clip {self.w_clip} must be in (0, 1] (OPENPI_DUQUANT_W_CLIP / --w-clip)")
        if self.act_clip is not None and not 0.0 < self.act_clip <= 1.0:
            raise ConfigError(f"activation clip {self.act_clip} must be in (0, 1] (OPENPI_DUQUANT_ACT_CLIP)")
        if self.act_pct is not None and not 50.0 < self.act_pct <= 100.0:
            raise ConfigError(f"activation percentile {self.act_pct} must be in (50, 100] (OPENPI_DUQUANT_ACT_PCT)")
        if self.act_clip_search and (self.act_pct is not None or self.act_static):
            raise ConfigError("the activation clip search (OPENPI_DUQUANT_ACT_CLIP_SEARCH / --act-clip-search) chooses "
                              "the per-token dynamic clip: drop OPENPI_DUQUANT_ACT_PCT / ACT_STATIC, or the search")
        if self.rotation_steps < 0:
            raise ConfigError("rotation steps must be >= 0 (OPENPI_DUQUANT_STEPS / --rotation-steps)")
        if self.rotation_refine_steps < 0:
            raise ConfigError("rotation refinement steps must be >= 0, 0 = off (OPENPI_DUQUANT_ROTATION_REFINE_STEPS / "
                              "--rotation-refine-steps)")
        if self.calib_steps < 1:
            raise ConfigError(f"calibration steps {self.calib_steps} must be >= 1 (OPENPI_DUQUANT_CALIB_STEPS)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} not in {list(BACKENDS)} (OPENPI_DUQUANT_BACKEND / --backend)")
        if self.w_group_size is not None and self.w_group_size < 8:
            raise ConfigError("weight group size must be >= 8 or unset (--w-group-size)")
        for label, pattern in (("INCLUDE", self.include), ("EXCLUDE", self.exclude)):
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"OPENPI_DUQUANT_{label} / --{label.lower()} is not a valid regular expression: "
                                  f"{pattern!r} ({err}); escape literal dots as \\. and balance parentheses") from err
        for label, overrides in (("OPENPI_DUQUANT_WBITS", self.wbits_overrides),
                                 ("OPENPI_DUQUANT_FORMAT_OVERRIDES", self.format_overrides)):
            for name, _ in overrides:
                if name.startswith("re:"):
                    try:
                        re.compile(name[3:])
                    except re.error as err:
                        raise ConfigError(f"{label}: bad regex {name!r}: {err}") from err

    def _sync_bits_to_format(self) -> None:
        """`format` fixes wbits / abits: left at their defaults they take the format's values; set to others, the
        config is contradictory (from_sources resolves flags against environment before this)."""
        fmt = format_spec(self.format, "OPENPI_DUQUANT_FORMAT / --format")
        object.__setattr__(self, "format", fmt.name)
        have = (self.wbits, 16 if self.abits in (0, 16) else self.abits)
        if have == (fmt.wbits, fmt.abits):
            return
        if (self.wbits, self.abits) != (_DEFAULT_WBITS, _DEFAULT_ABITS):
            acts = "float" if fmt.abits == 16 else f"{fmt.abits}-bit"
            raise ConfigError(f"format {fmt.name} means {fmt.wbits}-bit weights and {acts} activations, but "
                              f"wbits={self.wbits}, abits={self.abits} were given; give --format or --wbits/--abits, "
                              "not both")
        object.__setattr__(self, "wbits", fmt.wbits)
        object.__setattr__(self, "abits", fmt.abits)

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def smoothing_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        default = registry.method(self.method).default_alpha
        return 0.6 if default is None else default

    def weight_clip(self, bits: int) -> float:
        if self.w_clip is not None:
            return self.w_clip
        default = registry.rounding(self.weight_rounding).default_w_clip
        if default is not None:
            return default
        return 0.8 if bits <= 4 else 1.0

    @property
    def activation_clip(self) -> float:
        if self.act_clip is not None:
            return self.act_clip
        return default_act_clip(self.abits)

    @property
    def effective_exclude(self) -> str:
        return self.exclude if self.exclude is not None else default_exclude(self.include_action_head)

    @property
    def quantize_activations(self) -> bool:
        return self.abits not in (0, 16)

    @property
    def bits_label(self) -> str:
        return bits_name(self.wbits, self.abits)

    @property
    def format_name(self) -> str:
        """The global format: `format` when given, else the integer format wbits/abits mean (w4a8, w4a16, ...)."""
        return self.format or self.bits_label

    def layer_format(self, name: str) -> str:
        """One layer's format name: its `format_overrides` entry (exact name, then the first matching `re:`), else
        the global format, with the layer's `wbits_overrides` bits when it has some (integer formats only)."""
        fmt = lookup_override(self.format_overrides, name)
        if fmt is not None:
            return format_spec(fmt).name
        bits = lookup_override(self.wbits_overrides, name)
        if bits is None or bits == self.wbits:
            return self.format_name
        if self.format_name != self.bits_label:
            raise ConfigError(f"OPENPI_DUQUANT_WBITS / --wbits-overrides gives {name} {bits}-bit weights, but its "
                              f"format {self.format_name} has fixed bits; give that layer a format with "
                              "--format-overrides instead")
        return bits_name(bits, self.abits)

    def layer_format_spec(self, name: str):
        """The registered ``duquant.formats.Format`` of one layer (imports the formats registry, and torch)."""
        return format_spec(self.layer_format(name))

    def bits_for(self, name: str) -> int:
        """Weight bits for one layer: those of its format override, else its exact `wbits_overrides` entry, then
        the first matching `re:` entry, then wbits."""
        if lookup_override(self.format_overrides, name) is not None:
            return self.layer_format_spec(name).wbits
        bits = lookup_override(self.wbits_overrides, name)
        return self.wbits if bits is None else bits

    def activation_clip_for(self, abits: int) -> float:
        """The per-token activation clip of a layer whose format has `abits`-bit activations."""
        return self.act_clip if self.act_clip is not None else default_act_clip(abits)

    def replace(self, **changes) -> DuQuantConfig:
        return dataclasses.replace(self, **changes)

    def with_preset(self, preset: str | None) -> DuQuantConfig:
        """Apply a preset's scope and include (explicitly given values win in from_sources)."""
        if preset is None:
            return self
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        p = PRESETS[preset]
        return self.replace(preset=preset, scope=p.scope, include=p.include)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["wbits_overrides"] = [list(x) for x in self.wbits_overrides]
        d["format_overrides"] = [list(x) for x in self.format_overrides]
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> DuQuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown DuQuantConfig keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if "layers" in data:
            data["layers"] = tuple(data["layers"])
        if "wbits_overrides" in data:
            data["wbits_overrides"] = tuple((str(k), int(v)) for k, v in data["wbits_overrides"])
        if "format_overrides" in data:
            data["format_overrides"] = tuple((str(k), str(v)) for k, v in data["format_overrides"])
        return cls(**data)

    def layer_hash(self, name: str) -> str:
        """Hash of everything that decides one layer's pack (selection-only fields left out)."""
        relevant = {k: v for k, v in self.to_dict().items() if k in _PACK_FIELDS}
        relevant["wbits"] = self.bits_for(name)
        relevant["alpha"] = self.smoothing_alpha
        relevant["w_clip"] = self.weight_clip(relevant["wbits"])
        relevant["act_clip"] = self.activation_clip
        fmt = self.layer_format(name)
        if fmt != bits_name(relevant["wbits"], self.abits) or not format_spec(fmt).online_transform:
            # The layer's format, whenever it is not the integer format its bits always meant (packs written
            # before formats were selectable stay valid): a w4a8 pack is never reused as w4a16 or fp8.
            relevant["format"] = fmt
            relevant["act_clip"] = self.activation_clip_for(format_spec(fmt).abits)
        # zigzag / none hash as the bool permute once was (True / False), so packs written then stay valid
        relevant["permute"] = registry.permutation(self.permute).hash_value
        for key, default in _PACK_FIELDS_SINCE_ROUNDING.items():  # only when set: older packs stay valid
            if relevant.get(key) == default:
                relevant.pop(key)
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- sources ----------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> DuQuantConfig:
        """Environment over defaults; keyword overrides (Python/CLI) over both."""
        env_values = parse_env(os.environ if environ is None else environ)
        return cls.from_sources(env_values, overrides)

    @classmethod
    def from_sources(cls, env_values: Mapping, overrides: Mapping) -> DuQuantConfig:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        env_values = dict(env_values)
        # `format` and wbits/abits are one setting: the higher source's wins whole (a --format flag overrides
        # OPENPI_DUQUANT_WBITS_DEFAULT / _ABITS, a --wbits flag overrides OPENPI_DUQUANT_FORMAT); within one
        # source, a format and bits that disagree are an error (_sync_bits_to_format).
        if "format" in overrides:
            env_values.pop("wbits", None)
            env_values.pop("abits", None)
        elif "wbits" in overrides or "abits" in overrides:
            env_values.pop("format", None)
        for source, where in ((env_values, "OPENPI_DUQUANT_FORMAT and OPENPI_DUQUANT_WBITS_DEFAULT / _ABITS"),
                              (overrides, "--format and --wbits / --abits")):
            if source.get("format") is not None and ("wbits" in source or "abits" in source):
                fmt = format_spec(source["format"], "OPENPI_DUQUANT_FORMAT / --format")
                abits = source.get("abits", fmt.abits)
                if (source.get("wbits", fmt.wbits), 16 if abits in (0, 16) else abits) != (fmt.wbits, fmt.abits):
                    raise ConfigError(f"{where} disagree: format {fmt.name} is w{fmt.wbits}a{fmt.abits}, got "
                                      f"wbits={source.get('wbits', fmt.wbits)}, abits={abits}; give one of them")
        merged = {**env_values, **overrides}
        preset = merged.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} "
                                  f"(OPENPI_DUQUANT_PRESET / --preset)")
            p = PRESETS[preset]
            merged.setdefault("scope", p.scope)
            merged.setdefault("include", p.include)
        return cls(**merged)


_PACK_FIELDS = {"method", "wbits", "abits", "block_size", "block_out", "permute", "row_rot", "alpha", "rotation_steps",
                "w_symmetric", "w_clip", "w_group_size", "clip_search", "act_symmetric", "act_clip", "act_pct",
                "act_static", "share_transforms", "seed", "version", "weight_rounding", "gptq_damp",
                "gptq_act_order", "sequential", "act_clip_search", "rotation_refine_steps",
                "rotation_refine_smooth"}
# Added after packs were first written: hashed only when not at their default.
_PACK_FIELDS_SINCE_ROUNDING = {"weight_rounding": "rtn", "gptq_damp": 0.01, "gptq_act_order": False,
                               "sequential": False, "act_clip_search": False, "rotation_refine_steps": 0,
                               "rotation_refine_smooth": False}


_DEFAULT_WBITS = DuQuantConfig.wbits
_DEFAULT_ABITS = DuQuantConfig.abits


def format_spec(name: str, where: str = "format"):
    """The registered ``duquant.formats.Format`` called `name` (loaded through the registry: imports torch), or a
    ConfigError listing the known names."""
    try:
        return registry.get_format(name)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def lookup_override(overrides, name: str):
    """The value of `name` in (key, value) overrides: an exact key first, then the first `re:<regex>` key that
    matches (re.search); None when none applies. Shared by wbits_overrides and format_overrides."""
    for key, value in overrides:
        if key == name:
            return value
    for key, value in overrides:
        if key.startswith("re:") and re.search(key[3:], name):
            return value
    return None


# ---- environment -------------------------------------------------------------------------------------------------

def _bool(var: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{var}={value!r} is not a boolean; use 1 or 0")


def permutation_name(var: str, value) -> str:
    """A permutation setting (name, alias such as 1 / 0, or a bool) as its registered name; ConfigError naming
    the variable and the choices otherwise."""
    try:
        return registry.permutation(value).name
    except ValueError as err:
        raise ConfigError(f"{var}: {err}") from None


def _int(var: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{var}={value!r} is not an integer") from None


def _float(var: str, value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ConfigError(f"{var}={value!r} is not a number") from None


def parse_layer_list(var: str, value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.replace("\n", ",").split(",") if x.strip())


def parse_overrides(var: str, value: str, convert=lambda var, x: x.strip(), example: str = "4") -> tuple:
    """Per-layer overrides `name:value,name2:value` (a name may be `re:<regex>`; the last colon separates the
    value, which `convert(var, text)` parses). The one parser of --wbits-overrides and --format-overrides."""
    out = []
    for item in parse_layer_list(var, value):
        name, sep, val = item.rpartition(":")
        if not sep or not name or not val.strip():
            raise ConfigError(f"{var}: entry {item!r} must look like 'layer.name:{example}' or "
                              f"'re:<regex>:{example}' (comma-separated)")
        out.append((name.strip(), convert(var, val)))
    return tuple(out)


def parse_wbits_overrides(var: str, value: str) -> tuple[tuple[str, int], ...]:
    """`name:bits,name2:bits` (a name may be `re:<regex>`; the last colon separates the bits)."""
    return parse_overrides(var, value, _int, "4")


def parse_format_overrides(var: str, value: str) -> tuple[tuple[str, str], ...]:
    """`name:format,re:<regex>:format` (e.g. `re:gemma_expert:w4a16`); names are checked when the config is built."""
    return parse_overrides(var, value, lambda v, x: x.strip().lower(), "w4a16")


# variable suffix -> (field, parser). None as field: accepted for compatibility, has no effect here.
ENV_VARS: dict[str, tuple[str | None, object, str]] = {
    "SCOPE": ("scope", lambda v, x: x, "module-name prefix a layer must start with"),
    "INCLUDE": ("include", lambda v, x: x, "regex (re.search) a layer name must match"),
    "EXCLUDE": ("exclude", lambda v, x: x, "regex (re.search) that removes layers"),
    "LAYERS": ("layers", parse_layer_list, "explicit comma-separated whitelist of layer names"),
    "PRESET": ("preset", lambda v, x: x.strip(), f"one of {sorted(PRESETS)}"),
    "METHOD": ("method", lambda v, x: x.strip().lower(), f"one of {list(METHODS)}"),
    "WBITS_DEFAULT": ("wbits", _int, "weight bits for every selected layer (2, 3, 4, 8)"),
    "WBITS": ("wbits_overrides", parse_wbits_overrides, "per-layer weight bits 'name:bits,...'"),
    "ABITS": ("abits", _int, "activation bits (8, 4; 0 or 16 = float activations)"),
    "FORMAT": ("format", lambda v, x: x.strip().lower(), "quantization format of every selected layer (w4a8, "
               "w4a16, w8a8-fp8, ...; sets the weight and activation bits)"),
    "FORMAT_OVERRIDES": ("format_overrides", parse_format_overrides,
                         "per-layer formats 'name:format,re:<regex>:format'"),
    "BLOCK": ("block_size", _int, "rotation block size (paper 128; the fork's scripts use 16 or 64)"),
    "BLOCK_OUT": ("block_out", _int, "output-side block size for ROW_ROT=restore"),
    "PERMUTE": ("permute", permutation_name, f"permutation between the two rotations: one of "
                f"{', '.join(registry.PERMUTATIONS)} (1 = zigzag, 0 = none)"),
    "ROW_ROT": ("row_rot", lambda v, x: x.strip().lower(), "output-side rotation: 0 | restore | propagate"),
    "LS": ("alpha", _float, "smoothing strength alpha in [0, 1]"),
    "ACT_PCT": ("act_pct", _float, "activation clipping percentile, e.g. 99.9"),
    "ACT_CLIP": ("act_clip", _float, "per-token activation clip ratio (paper 0.9)"),
    "W_CLIP": ("w_clip", _float, "per-channel weight clip ratio (paper 0.8)"),
    "W_SYM": ("w_symmetric", _bool, "symmetric weights (1/0)"),
    "ACT_SYM": ("act_symmetric", _bool, "symmetric activations (1/0)"),
    "ACT_STATIC": ("act_static", _bool, "one static per-tensor activation scale (1/0)"),
    "CLIP_SEARCH": ("clip_search", _bool, "per-channel weight clip search on calibration data (1/0)"),
    "ACT_CLIP_SEARCH": ("act_clip_search", _bool, "per-token activation clip searched per layer group by output "
                        "error (1/0)"),
    "STEPS": ("rotation_steps", _int, "greedy rotation steps (paper 256)"),
    "ROTATION_REFINE_STEPS": ("rotation_refine_steps", _int, "Adam steps refining the greedy block rotations by "
                              "quantized output error on the calibration sample (0 = off)"),
    "ROTATION_REFINE_SMOOTH": ("rotation_refine_smooth", _bool, "the rotation refinement also learns the per-channel "
                               "smoothing vector (1/0; needs ROTATION_REFINE_STEPS > 0)"),
    "WEIGHT_ROUNDING": ("weight_rounding", lambda v, x: x.strip().lower(), f"one of {list(WEIGHT_ROUNDINGS)}"),
    "GPTQ_DAMP": ("gptq_damp", _float, "GPTQ damping, fraction of the mean Hessian diagonal (0.01)"),
    "GPTQ_ACT_ORDER": ("gptq_act_order", _bool, "GPTQ in decreasing Hessian-diagonal order (1/0)"),
    "SEQUENTIAL": ("sequential", _bool, "calibrate block by block through the quantized blocks (1/0)"),
    "CALIB_STEPS": ("calib_steps", _int, "calibration batches"),
    "SEED": ("seed", _int, "seed of the random rotations"),
    "PACKDIR": ("packdir", lambda v, x: x, "directory of per-layer pack files"),
    "BACKEND": ("backend", lambda v, x: x.strip().lower(), "fake | gpu"),
    "INCLUDE_ACTION_HEAD": ("include_action_head", _bool, "also quantize action_in_proj / action_out_proj"),
    "DEBUG": ("debug", _bool, "print the selection summary and per-part counts"),
    "DRYRUN": ("dryrun", _bool, "list the selected layers and change nothing"),
    # Read by the fork, no effect here (kept so existing scripts run unchanged):
    "PROFILE": (None, _bool, "accepted for compatibility; use `duquant bench`"),
    "PRECACHE_WEIGHTS": (None, _bool, "accepted for compatibility; packs are always cached"),
    "INPUT_TRANSPOSE": (None, _bool, "accepted for compatibility; unused"),
}


def parse_env(environ: Mapping[str, str]) -> dict:
    """Read every OPENPI_DUQUANT_* variable; an unknown one is an error with the closest known name."""
    values: dict = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        suffix = var[len(ENV_PREFIX):]
        if suffix not in ENV_VARS:
            close = difflib.get_close_matches(suffix, list(ENV_VARS), n=1)
            hint = f"did you mean {ENV_PREFIX}{close[0]}? " if close else ""
            raise ConfigError(f"unknown environment variable {var}; {hint}known: "
                              + ", ".join(ENV_PREFIX + k for k in ENV_VARS))
        field_name, parser, _ = ENV_VARS[suffix]
        if field_name is None:
            continue
        if suffix in ("SCOPE", "INCLUDE", "EXCLUDE", "PACKDIR") and raw == "" and suffix != "SCOPE":
            continue  # an empty regex/dir from a script means "default"
        values[field_name] = parser(var, raw)
    return values


def env_is_active(environ: Mapping[str, str] | None = None) -> bool:
    """The fork's rule: quantization is on when any OPENPI_DUQUANT_* variable other than PACKDIR is set."""
    environ = os.environ if environ is None else environ
    return any(k.startswith(ENV_PREFIX) and k != ENV_PREFIX + "PACKDIR" for k in environ)


# ---- CLI flags (each has its environment twin) -----------------------------------------------------------------

def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quantization (each flag overrides its OPENPI_DUQUANT_* twin)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="part of pi0 to quantize [PRESET]")
    g.add_argument("--method", choices=METHODS, help="duquant (default) | smoothquant | hadamard | rtn [METHOD]")
    g.add_argument("--scope", help="module-name prefix [SCOPE]")
    g.add_argument("--include", help="regex a layer name must match (re.search) [INCLUDE]")
    g.add_argument("--exclude", help="regex that removes layers (re.search) [EXCLUDE]")
    g.add_argument("--layers", type=lambda s: parse_layer_list("--layers", s),
                   help="explicit comma-separated layer names [LAYERS]")
    g.add_argument("--wbits", type=int, help="weight bits 2|3|4|8 (default 4) [WBITS_DEFAULT]")
    g.add_argument("--wbits-overrides", type=lambda s: parse_wbits_overrides("--wbits-overrides", s),
                   help="per-layer bits 'name:bits,re:<regex>:bits' [WBITS]")
    g.add_argument("--abits", type=int, help="activation bits 8|4, 0/16 = float (default 8) [ABITS]")
    g.add_argument("--format", type=lambda s: s.strip().lower(),
                   help="format of every selected layer: w{2,3,4,8}a{4,8}, w{2,3,4,8}a16 (weight-only, no "
                        "activation transform), w8a8-fp8; sets --wbits/--abits (default: what they mean, w4a8) "
                        "[FORMAT]")
    g.add_argument("--format-overrides", type=lambda s: parse_format_overrides("--format-overrides", s),
                   help="per-layer formats 'name:fmt,re:<regex>:fmt', e.g. 're:gemma_expert:w4a16' "
                        "[FORMAT_OVERRIDES]")
    g.add_argument("--block-size", type=int, help="rotation block size (default 128) [BLOCK]")
    g.add_argument("--block-out", type=int, help="output block size for --row-rot restore [BLOCK_OUT]")
    g.add_argument("--permute", type=lambda s: permutation_name("--permute", s),
                   help=f"permutation between the rotations: {' | '.join(registry.PERMUTATIONS)} (default zigzag; "
                        "1 = zigzag, 0 = none) [PERMUTE]")
    g.add_argument("--row-rot", choices=ROW_ROT_VALUES, help="output-side rotation [ROW_ROT]")
    g.add_argument("--alpha", type=float, help="smoothing strength (default 0.6) [LS]")
    g.add_argument("--act-pct", type=float, help="activation clipping percentile [ACT_PCT]")
    g.add_argument("--act-clip", type=float, help="per-token activation clip ratio (default 0.9 at <=4 bits, "
                   "1.0 at 8) [ACT_CLIP]")
    g.add_argument("--w-clip", type=float, help="per-channel weight clip ratio (default 0.8 at <=4 bits, 1.0 at 8) "
                   "[W_CLIP]")
    g.add_argument("--clip-search", action="store_const", const=True, help="search weight clips [CLIP_SEARCH]")
    g.add_argument("--act-clip-search", action="store_const", const=True,
                   help="activation clip searched per layer group by output error [ACT_CLIP_SEARCH]")
    g.add_argument("--act-static", action="store_const", const=True, help="static per-tensor act scale [ACT_STATIC]")
    g.add_argument("--rotation-steps", type=int, help="greedy rotation steps (default 256) [STEPS]")
    g.add_argument("--rotation-refine-steps", type=int,
                   help="Adam steps refining the greedy block rotations by quantized output error (default 0 = off) "
                        "[ROTATION_REFINE_STEPS]")
    g.add_argument("--rotation-refine-smooth", action="store_const", const=True,
                   help="the rotation refinement also learns the per-channel smoothing vector "
                        "[ROTATION_REFINE_SMOOTH]")
    g.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS,
                   help="rtn (default) | gptq: error-compensating rounding [WEIGHT_ROUNDING]")
    g.add_argument("--gptq-damp", type=float, help="GPTQ damping (default 0.01) [GPTQ_DAMP]")
    g.add_argument("--act-order", dest="gptq_act_order", action="store_const", const=True,
                   help="GPTQ activation order [GPTQ_ACT_ORDER]")
    g.add_argument("--sequential", action="store_const", const=True,
                   help="sequential (block-by-block) calibration [SEQUENTIAL]")
    g.add_argument("--calib-steps", type=int, help="calibration batches (default 32) [CALIB_STEPS]")
    g.add_argument("--seed", type=int, help="seed of the random rotations [SEED]")
    g.add_argument("--packdir", help="pack directory [PACKDIR]")
    g.add_argument("--backend", choices=BACKENDS, help="fake | gpu [BACKEND]")
    g.add_argument("--include-action-head", action="store_const", const=True, help="[INCLUDE_ACTION_HEAD]")
    g.add_argument("--debug", action="store_const", const=True, help="selection summary [DEBUG]")
    g.add_argument("--dryrun", action="store_const", const=True, help="list layers, change nothing [DRYRUN]")


_ARG_TO_FIELD = {"block_size": "block_size", "rotation_steps": "rotation_steps", "wbits_overrides": "wbits_overrides"}


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> DuQuantConfig:
    """CLI flags over environment over defaults."""
    fields = {f.name for f in dataclasses.fields(DuQuantConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return DuQuantConfig.from_env(environ, **overrides)


def describe_env() -> list[tuple[str, str, str]]:
    """(variable, field, meaning) rows for docs and --help."""
    return [(ENV_PREFIX + k, f or "(ignored)", d) for k, (f, _, d) in ENV_VARS.items()]


__all__ = ["DuQuantConfig", "ConfigError", "Preset", "PRESETS", "PART_SCOPES", "DEFAULT_INCLUDE", "default_exclude",
           "parse_env", "env_is_active", "add_cli_args", "from_args", "describe_env", "format_spec",
           "lookup_override", "parse_overrides"]
