"""The one registry of choices: transform methods, weight roundings and DuQuant's permutations.

Adding a method or a rounding is one module (``duquant/methods/<name>.py`` with ``build(...)``, or
``duquant/rounding/<name>.py`` with ``round_weight(...)``) and one ``register_*`` line at the bottom of this file;
a permutation is a planner function (``duquant.transform.zigzag_plan``'s signature) and one line.
Everything else (config validation, CLI choices, ``build_transform``, which methods need calibration data, the
report's method list, pack keys) reads these tables.

Torch-free on purpose (config.py imports it); implementations are imported lazily by their dotted path. The
quantization formats have their own registry (``duquant.formats``, which needs torch); ``get_format`` /
``format_names`` reach it lazily, so config validation can name them without importing torch up front.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """A transform method. `builder` is "module:function" with the signature of
    ``duquant.methods.duquant.build``."""

    name: str
    builder: str
    needs_activations: bool  # calibration statistics required (an error without them, or a documented fallback)
    default_alpha: float | None  # smoothing strength when --alpha / OPENPI_DUQUANT_LS is not given
    summary: str
    permutes: bool = False  # takes config.permute (the report runs one row per permutation for it)


@dataclass(frozen=True)
class RoundingSpec:
    """A weight rounding. `rounder` is "module:function" with the signature of
    ``duquant.rounding.rtn.round_weight``."""

    name: str
    rounder: str
    needs_activations: bool  # needs the transformed calibration inputs (e.g. GPTQ's Hessian)
    summary: str
    default_w_clip: float | None = None  # weight clip when --w-clip is not given; None: 0.8 at <= 4 bits, else 1.0
    # also takes x_q=: the layer's transformed calibration sample quantized as the layer quantizes its activations
    # (None where the activations stay in float); the roundings of duquant/rounding/act_aware.py
    act_aware: bool = False


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation between DuQuant's two rotations (``config.permute``). `planner` is "module:function" with
    the signature of ``duquant.transform.zigzag_plan``; None means no permutation and no second rotation."""

    name: str
    planner: str | None
    summary: str
    aliases: tuple[str, ...] = ()  # other spellings accepted from the environment / CLI (lower case)
    label: str = ""  # suffix of the report's row label ("duquant+shuffle"); "" for the default
    # The value hashed into pack keys. permute was a bool when packs were first written: zigzag and none hash as
    # True and False did, so those packs stay valid.
    hash_value: bool | str = ""
    # "module:function" (in_features, block_size) -> why this permutation cannot take that width, or None; a layer
    # it cannot take gets `fallback` instead (and the summaries say so).
    unsupported: str | None = None
    fallback: str | None = None


METHODS: dict[str, MethodSpec] = {}
ROUNDINGS: dict[str, RoundingSpec] = {}
PERMUTATIONS: dict[str, PermutationSpec] = {}


def _add(table: dict, kind: str, spec):
    if spec.name in table:
        raise ValueError(f"{kind} {spec.name!r} is already registered")
    table[spec.name] = spec
    return spec


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; use one of {', '.join(table)}") from None


def register_method(spec: MethodSpec) -> MethodSpec:
    return _add(METHODS, "method", spec)


def register_rounding(spec: RoundingSpec) -> RoundingSpec:
    return _add(ROUNDINGS, "weight rounding", spec)


def register_permutation(spec: PermutationSpec) -> PermutationSpec:
    return _add(PERMUTATIONS, "permutation", spec)


def method(name: str) -> MethodSpec:
    return _lookup(METHODS, "method", name)


def rounding(name: str) -> RoundingSpec:
    return _lookup(ROUNDINGS, "weight rounding", name)


def permutation(value: str | bool) -> PermutationSpec:
    """The permutation a config value names: a registered name or alias (any case; True and False are the
    aliases "true" and "false", the bool permute once was). ValueError listing the choices otherwise."""
    key = str(value).strip().lower()
    for spec in PERMUTATIONS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise ValueError(f"unknown permutation {value!r}; use one of {', '.join(PERMUTATIONS)} "
                     "(1/true/on mean zigzag, 0/false/off mean none)")


def permutation_fallback(name: str, in_features: int, block_size: int) -> tuple[str, str | None]:
    """(the permutation a layer of this width gets when `name` is asked for, why it is not `name` or None)."""
    spec = permutation(name)
    why = load(spec.unsupported)(in_features, block_size) if spec.unsupported else None
    if why is None:
        return spec.name, None
    return permutation_fallback(spec.fallback, in_features, block_size)[0], why


FORMATS = "duquant.formats"  # the formats registry (names(), get(name)), imported on first use


def get_format(name: str):
    """The registered ``duquant.formats.Format`` called `name`; ValueError (listing the known names) otherwise."""
    return load(f"{FORMATS}:get")(name)


def format_names() -> list[str]:
    return load(f"{FORMATS}:names")()


def load(path: str) -> Callable:
    """Import "package.module:function"."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- the registrations (the only place that lists the choices) -------------------------------------------------
register_method(MethodSpec("rtn", "duquant.methods.rtn:build", False, None, "no transform"))
register_method(MethodSpec("smoothquant", "duquant.methods.smoothquant:build", True, 0.5,
                           "per-channel smoothing only (SmoothQuant)"))
register_method(MethodSpec("hadamard", "duquant.methods.hadamard:build", False, None,
                           "block Hadamard rotation, QuaRot-style, no smoothing"))
register_method(MethodSpec("duquant", "duquant.methods.duquant:build", True, 0.6,
                           "smoothing + greedy block rotation + zigzag permutation + second rotation (the paper)",
                           permutes=True))

register_permutation(PermutationSpec("zigzag", "duquant.transform:zigzag_plan",
                                     "channels dealt over the blocks by magnitude, in snake order (the paper)",
                                     aliases=("1", "true", "yes", "on"), hash_value=True))
register_permutation(PermutationSpec("shuffle", "duquant.transform:shuffle_plan",
                                     "a fixed transpose-like permutation (R1's columns sorted by magnitude); widths "
                                     "whose block count does not divide the block size get zigzag",
                                     label="+shuffle", hash_value="shuffle",
                                     unsupported="duquant.transform:shuffle_unsupported", fallback="zigzag"))
# "" is "none" because the bool parser read an empty OPENPI_DUQUANT_PERMUTE as false
register_permutation(PermutationSpec("none", None, "rot1 only, no permutation or second rotation (the paper's Perm0)",
                                     aliases=("0", "false", "no", "off", ""), label="+noperm", hash_value=False))

register_rounding(RoundingSpec("rtn", "duquant.rounding.rtn:round_weight", False,
                               "round to nearest with a fixed clip"))
# GPTQ's error feedback handles the range itself: a 0.8 clip makes it push clamping errors along the row
# (MiniLM W4A8 embedding cosine, RTN grid + GPTQ: 0.907 with clip 0.8, 0.973 with 1.0; docs/algorithm.md).
register_rounding(RoundingSpec("gptq", "duquant.rounding.gptq:round_weight", True,
                               "GPTQ: error-compensating rounding with the Hessian of the transformed inputs",
                               default_w_clip=1.0))
# LWC stand-in: each output row takes the clip (from a grid and the configured one) whose GPTQ-rounded row gives
# the smallest output error on the calibration inputs (duquant/rounding/gptq_clip.py).
register_rounding(RoundingSpec("gptq-clip", "duquant.rounding.gptq_clip:round_weight", True,
                               "GPTQ with a per-row clip searched by the layer's output error (an LWC stand-in)",
                               default_w_clip=1.0))
# GPTQ / gptq-clip fitted to the layer's own quantized activations: the target W_t - W_t (C^T + D) B^-1 rounded with
# the Hessian B = E[q^T q] of the quantized inputs (duquant/rounding/act_aware.py; plain gptq at float activations)
register_rounding(RoundingSpec("gptq-aq", "duquant.rounding.act_aware:round_gptq", True,
                               "GPTQ fitted to the layer's quantized activations (GPTAQ-style target and Hessian)",
                               default_w_clip=1.0, act_aware=True))
register_rounding(RoundingSpec("gptq-clip-aq", "duquant.rounding.act_aware:round_gptq_clip", True,
                               "gptq-clip fitted to the layer's quantized activations (gptq-aq's target and Hessian)",
                               default_w_clip=1.0, act_aware=True))
