"""The engine's entry points: ``quantize(model, config, calibrate=fn)`` and ``apply_from_env(model)``.

select -> (packs) -> calibrate -> per group: transform, fold, quantize -> swap modules in place -> QuantReport.
Works on any model built from ``nn.Linear``; nothing here knows about pi0.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from duquant import __version__, formats, registry
from duquant.calibration import CalibrationResult, LayerStats
from duquant.calibration import calibrate as run_calibration
from duquant.config import ConfigError, DuQuantConfig, env_is_active
from duquant.layers import DuQuantLinear, rotate_rows
from duquant.packs import FORMAT_VERSION, PackStore, group_fingerprint, weight_fingerprint
from duquant.quantizers import search_weight_clip, static_activation_qparams
from duquant.selection import layer_line, part_counts, permutation_summary, select_layers, selection_summary
from duquant.timing import PhaseTimer, null_timer
from duquant.transform import LayerTransform, build_transform, hadamard_block_rotation

NEEDS_ACTIVATIONS = {name for name, spec in registry.METHODS.items() if spec.needs_activations}


def needs_calibration(config: DuQuantConfig) -> bool:
    """Whether the method, the weight rounding or an activation option needs calibration statistics."""
    return (registry.method(config.method).needs_activations
            or registry.rounding(config.weight_rounding).needs_activations
            or bool(config.act_static or config.act_pct or config.act_clip_search))


def integer_weights(fmt: formats.Format) -> bool:
    """Whether the format stores integer weight codes (what the weight roundings, rtn and gptq, produce)."""
    return fmt.weights.startswith("int")


def layer_needs_stats(config: DuQuantConfig, fmt: formats.Format) -> str | None:
    """Why a layer of format `fmt` needs calibration statistics under `config` (None: it does not). A format
    without an online transform (w4a16) skips the method, so only its weight rounding can need them."""
    if fmt.online_transform and registry.method(config.method).needs_activations:
        return f"method {config.method!r}"
    if integer_weights(fmt) and registry.rounding(config.weight_rounding).needs_activations:
        return f"weight rounding {config.weight_rounding!r}"
    if fmt.abits != 16 and (config.act_pct or (config.act_static and fmt.activations.startswith("int"))):
        return "act_static / act_pct"
    if fmt.abits != 16 and config.act_clip_search and fmt.activations.startswith("int"):
        return "act_clip_search"
    if integer_weights(fmt) and config.clip_search:
        return "clip_search"  # falls back to the weight MSE without statistics (documented), never required
    return None


def check_layer_formats(config: DuQuantConfig, layer_formats: dict[str, formats.Format]) -> list[str]:
    """Settings a layer's format cannot take are a ConfigError naming the layers; returns the warning lines (one
    per kind of skipped setting) for the caller to print."""
    non_int = [n for n, f in layer_formats.items() if not integer_weights(f)]
    if non_int:
        fmt_names = sorted({layer_formats[n].name for n in non_int})
        bad = [why for why, on in (
            (f"--weight-rounding {config.weight_rounding} (GPTQ rounds to an integer grid)",
             config.weight_rounding != "rtn"),
            ("--clip-search (a per-channel integer clip)", config.clip_search),
            ("--w-group-size (one scale per output channel)", config.w_group_size is not None)) if on]
        if bad:
            raise ConfigError(f"{len(non_int)} selected layers (e.g. {non_int[0]}) have format {', '.join(fmt_names)} "
                              f"({layer_formats[non_int[0]].weights} weights), which cannot take "
                              f"{'; '.join(bad)}: drop it, or give those layers an integer format "
                              "(--format-overrides)")
    warnings = []
    skipped = [n for n, f in layer_formats.items() if not f.online_transform]
    if skipped and config.method != "rtn":
        fmt_names = sorted({layer_formats[n].name for n in skipped})
        warnings.append(f"[duquant] method {config.method} skipped on {len(skipped)} layers of weight-only format "
                        f"{', '.join(fmt_names)} (no activation transform: identity; weights rounded by "
                        f"{config.weight_rounding}), e.g. {skipped[0]}")
    return warnings


@dataclass
class LayerRecord:
    name: str
    in_features: int
    out_features: int
    wbits: int
    abits: int
    method: str
    transform_kind: str
    group: list[str]
    from_pack: bool
    bytes_before: int
    bytes_after: int
    act_clip: float
    format: str = ""  # the layer's format name (duquant.formats): w4a8, w4a16, w8a8-fp8, ...
    format_label: str = ""  # Format.label(): "w4a16 (int4 weights, bf16 activations)"
    weight_rounding: str = "rtn"
    permutation: str = "none"  # the permutation its transform uses (a shuffle request may give zigzag)


@dataclass
class QuantReport:
    config: dict
    layers: list[LayerRecord] = field(default_factory=list)
    total_linear: int = 0
    dryrun: bool = False
    calibration_seconds: float = 0.0
    quantization_seconds: float = 0.0
    pack_hits: int = 0
    pack_misses: int = 0
    stale: list[tuple[str, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    # Wall seconds per phase (duquant.timing): fingerprints, pack_loads, calibration, transform_search, rounding,
    # pack_writes, swap; transform_search + rounding make up most of quantization_seconds.
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers) if not self.dryrun else len(self.lines)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def part_counts(self) -> dict[str, int]:
        return part_counts([r.name for r in self.layers])

    def format_counts(self) -> dict[str, dict[str, int]]:
        """{part: {format label: layers}} (parts as in part_counts; parts without layers left out)."""
        from duquant.selection import part_of

        out: dict[str, dict[str, int]] = {}
        for r in self.layers:
            per = out.setdefault(part_of(r.name), {})
            per[r.format_label] = per.get(r.format_label, 0) + 1
        return out

    def summary(self) -> str:
        if self.dryrun:
            return f"dry run: {len(self.lines)} layers would be quantized"
        kinds = sorted({r.transform_kind for r in self.layers})
        out = [f"quantized {len(self.layers)} of {self.total_linear} Linear layers "
               f"({', '.join(f'{k} {v}' for k, v in self.part_counts().items() if v)})",
               f"transform: {', '.join(kinds)}; weights {self.bytes_before / 2**20:.2f} MiB -> "
               f"{self.bytes_after / 2**20:.2f} MiB",
               "formats: " + "; ".join(f"{part}: " + ", ".join(f"{label} x{n}" for label, n in per.items())
                                       for part, per in self.format_counts().items()),
               f"calibration {self.calibration_seconds:.2f} s, quantization {self.quantization_seconds:.2f} s, "
               f"packs: {self.pack_hits} reused, {self.pack_misses} computed"]
        if self.phase_seconds:
            out.append("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.phase_seconds.items()))
        perm_line = permutation_summary(self.config.get("permute", "zigzag"),
                                        [(r.permutation, r.in_features) for r in self.layers
                                         if r.permutation != "none"], self.config.get("block_size", 128))
        if perm_line:
            out.insert(2, perm_line)
        for name, why in self.stale[:5]:
            out.append(f"recomputed stale pack {name}: {why}")
        return "\n".join(out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bytes_before"] = self.bytes_before
        d["bytes_after"] = self.bytes_after
        d["formats"] = self.format_counts()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _seed_for(config: DuQuantConfig, name: str) -> int:
    return (config.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def quantize(model: nn.Module, config: DuQuantConfig | None = None,
             calibrate: Callable[[nn.Module], None] | None = None, *, calibration: CalibrationResult | None = None,
             progress: bool = True, verbose: bool = True, transforms: dict | None = None) -> QuantReport:
    """Replace the selected ``nn.Linear`` layers of `model` by ``DuQuantLinear`` in place.

    `calibrate(model)` runs the forward passes used for calibration (any number of batches); it is called at most
    once, and not at all when every layer is found in the pack directory. `calibration` passes statistics recorded
    earlier (``duquant.calibration.calibrate``) instead, e.g. to compare several methods on one calibration run.
    With ``config.sequential`` `calibrate` is called once per transformer block (the first call may be replaced by
    `calibration`): each block's statistics come from the float inputs passed through the blocks before it,
    already quantized, as the official code calibrates. `transforms` is an optional cache of built transforms
    shared between calls on the same statistics (the report uses it across bit widths and parts).
    """
    config = config or DuQuantConfig()
    selection = select_layers(model, config)
    report = QuantReport(config=config.to_dict(), total_linear=selection.total_linear)
    if config.debug and verbose:
        _log(selection_summary(model, selection, config))
    layer_formats = {n: config.layer_format_spec(n) for n in selection.names}
    for line in check_layer_formats(config, layer_formats):
        if verbose:
            _log(line)
    if config.dryrun:
        report.dryrun = True
        report.lines = [layer_line(n, m, config) for n, m in selection.modules.items()]
        return report
    if config.backend == "gpu":
        from duquant import kernels

        ok, why = kernels.gpu_available()
        if not ok:
            raise RuntimeError(f"OPENPI_DUQUANT_BACKEND=gpu cannot run here: {why}. Use --backend fake.")

    if config.row_rot == "propagate" and verbose:
        _log("[duquant] ROW_ROT=propagate is run as 'restore': leaving outputs in a rotated basis would change "
             "the model's function")
    store = PackStore(config.packdir) if config.packdir else None
    if store is not None:
        orphans = store.sweep_orphans()
        if orphans and verbose:
            _log(f"[duquant] removed {len(orphans)} temporary file(s) a killed pack write left in {store.root}")
    first = next(iter(selection.modules.values()), None)
    timer = PhaseTimer(first.weight.device if first is not None else None)
    with timer("fingerprints"):
        fingerprints = {n: weight_fingerprint(m.weight, m.bias) for n, m in selection.modules.items()}

    # 1. Packs: a layer whose pack matches its config and weights (and its group's weights) is loaded.
    loaded: dict[str, DuQuantLinear] = {}
    start = timer.mark()
    if store is not None:
        for name, module in selection.modules.items():
            meta, why = store.check(name, config_hash=config.layer_hash(name),
                                    shape=(module.out_features, module.in_features), fingerprint=fingerprints[name])
            if meta is not None and meta.get("format", layer_formats[name].name) != layer_formats[name].name:
                meta, why = None, f"format {meta['format']} != {layer_formats[name].name}"
            if meta is not None:
                group = meta.get("group", [name])
                if any(g not in fingerprints for g in group):
                    meta, why = None, "group members not selected now"
                elif meta.get("group_fingerprint") != group_fingerprint([fingerprints[g] for g in group]):
                    meta, why = None, "weights of a layer sharing the transform changed"
            if meta is None:
                if why != "no pack":
                    store.stale.append((name, why))
                    if verbose:
                        _log(f"[duquant] pack for {name} is stale ({why}); recomputing")
                continue
            loaded[name] = layer_from_pack(store.load(name).tensors, meta, module, config)
    # A group's shared transform comes from all its members: one with a missing pack (a run killed between
    # the packs of a group) recomputes the whole group, so a resumed run gives the uninterrupted model.
    partial = [n for n, layer in loaded.items() if any(g not in loaded for g in layer.group or [n])]
    for name in partial:
        del loaded[name]
    todo = {n: m for n, m in selection.modules.items() if n not in loaded}
    timer.since("pack_loads", start)

    # 2. Calibration, only for what the packs did not provide.
    calib: CalibrationResult | None = None
    # Per layer: a weight-only format (w4a16) needs statistics only for its weight rounding (GPTQ). When any layer
    # needs them, every layer to quantize is recorded (its group, layers fed one input, then shares one transform
    # object, identity ones included: the gpu backend runs a group as one GEMM).
    why_stats = {n: why for n in todo if (why := layer_needs_stats(config, layer_formats[n]))}
    needs_stats = bool(why_stats)
    built: dict[str, tuple[DuQuantLinear, dict]] = {}
    if todo and needs_stats and config.sequential:
        if calibrate is None:
            raise ValueError("sequential calibration runs the calibration passes once per block: pass "
                             "calibrate=fn (or set sequential=False to use a recorded calibration)")
        built, report.calibration_seconds, report.quantization_seconds = _quantize_sequential(
            model, todo, calibrate, config, calibration, transforms, progress, timer)
        timer.add("calibration", report.calibration_seconds)
    elif todo and needs_stats and calibration is not None:
        missing = [n for n in why_stats if n not in calibration.stats]
        if missing:
            raise ValueError(f"the calibration passed in has no statistics for {len(missing)} selected layers, "
                             f"e.g. {missing[:3]}; record it over a superset of the selection")
        groups = [[n for n in g if n in todo] for g in calibration.groups]
        calib = CalibrationResult({n: calibration.stats[n] for n in todo if n in calibration.stats},
                                  _cover([g for g in groups if g], todo), 0.0)
    elif todo and needs_stats and calibrate is not None:
        calib = run_calibration(model, todo, calibrate, max_tokens=config.calib_tokens, seed=config.seed,
                                hessian=_wants_hessian(config))
        report.calibration_seconds = calib.seconds
        timer.add("calibration", calib.seconds)
    elif todo and any(why != "clip_search" for why in why_stats.values()):
        # Never a quiet weight-only DuQuant: its rotations would be built for the weights, not the activations.
        # (clip_search alone falls back to the weight MSE, as documented.)
        required = [n for n, why in why_stats.items() if why != "clip_search"]
        needs = why_stats[required[0]]
        raise ValueError(f"{needs} needs activation statistics for {len(required)} layers without a pack (e.g. "
                         f"{required[0]}): pass calibrate=fn (runs your calibration forward passes) or "
                         "calibration=<duquant.calibration.calibrate(...)>, or point packdir at packs written by "
                         "a calibrated run (duquant quantize); method 'rtn' or 'hadamard' needs no calibration")

    # 3. Transform + quantize each group (done above, block by block, in sequential mode).
    if not built:
        start = time.perf_counter()
        groups = calib.groups if calib is not None else [[n] for n in todo]
        built = _quantize_groups(groups, todo, calib, config, transforms, progress, timer)
        report.quantization_seconds = time.perf_counter() - start

    # 4. Save new packs, swap modules, build the report.
    manifest = {}
    start = timer.mark()
    for name in todo:
        layer, meta = built[name]
        if store is not None:
            meta = {**meta, "config_hash": config.layer_hash(name), "config": config.to_dict(),
                    "weight_fingerprint": fingerprints[name],
                    "group_fingerprint": group_fingerprint([fingerprints[g] for g in meta["group"]]),
                    "duquant_version": __version__}
            path = store.save(name, layer_tensors(layer), meta)
            # per entry: entries of layers not rewritten this run stay as an older run wrote them
            manifest[name] = {"file": path.name, "config_hash": meta["config_hash"],
                              "weight_fingerprint": fingerprints[name], "transform_kind": meta["transform_kind"],
                              "weight_rounding": meta["weight_rounding"], "format": meta["format"],
                              "pack_format_version": FORMAT_VERSION}
        loaded[name] = layer
    if store is not None and manifest:
        store.write_manifest(manifest)
    timer.since("pack_writes", start)
    report.pack_hits = len(selection) - len(todo)
    report.pack_misses = len(todo)
    report.stale = list(store.stale) if store is not None else []

    start = timer.mark()
    for name in selection.names:
        old = selection.modules[name]
        new = loaded[name]
        new.backend = config.backend
        _set_module(model, name, new)
        report.layers.append(LayerRecord(
            name=name, in_features=old.in_features, out_features=old.out_features, wbits=new.wbits,
            abits=new.abits, method=new.method, transform_kind=new.transform.kind,
            group=getattr(new, "group", [name]), from_pack=name not in todo,
            bytes_before=old.weight.numel() * old.weight.element_size()
            + (0 if old.bias is None else old.bias.numel() * old.bias.element_size()),
            bytes_after=new.weight_bytes(), act_clip=new.act_clip, format=new.format,
            format_label=new.fmt.label(), weight_rounding=getattr(new, "weight_rounding", config.weight_rounding),
            permutation=new.transform.permutation))
    timer.since("swap", start)
    report.phase_seconds = timer.rounded()
    if verbose:
        _log("[duquant] " + report.summary().replace("\n", "\n[duquant] "))
    return report


def _cover(groups: list[list[str]], names) -> list[list[str]]:
    """`groups` plus a singleton for every name none of them holds (layers a calibration did not record)."""
    held = {n for g in groups for n in g}
    return groups + [[n] for n in names if n not in held]


def split_by_transform(group: list[str], config: DuQuantConfig) -> list[list[str]]:
    """A group of layers fed one input, split by whether their formats take an online transform: the weight-only
    members (w4a16) share an identity transform, the others the method's."""
    online = [n for n in group if config.layer_format_spec(n).online_transform]
    offline = [n for n in group if n not in online]
    return [g for g in (online, offline) if g]


def _wants_hessian(config: DuQuantConfig) -> bool:
    """GPTQ uses the Hessian over every calibration token when recording it is cheap enough (narrow layers)."""
    return registry.rounding(config.weight_rounding).needs_activations


def _quantize_groups(groups: list[list[str]], todo: dict[str, nn.Linear], calib: CalibrationResult | None,
                     config: DuQuantConfig, transforms: dict | None, progress: bool,
                     timer: PhaseTimer | None = None) -> dict[str, tuple[DuQuantLinear, dict]]:
    from tqdm.auto import tqdm

    if not config.share_transforms:
        groups = [[n] for g in groups for n in g]
    groups = [part for g in groups for part in split_by_transform(g, config)]
    built = {}
    for group in tqdm(groups, desc=f"quantize ({config.method})", disable=not progress, leave=False):
        stats = calib.stats.get(group[0]) if calib is not None else None  # None: a layer not recorded
        layers, metas = quantize_group(group, {n: todo[n] for n in group}, stats, config, transforms=transforms,
                                       timer=timer)
        for n in group:
            built[n] = (layers[n], metas[n])
    return built


def _quantize_sequential(model: nn.Module, todo: dict[str, nn.Linear], calibrate: Callable[[nn.Module], None],
                         config: DuQuantConfig, first: CalibrationResult | None, transforms: dict | None,
                         progress: bool, timer: PhaseTimer | None = None
                         ) -> tuple[dict[str, tuple[DuQuantLinear, dict]], float, float]:
    """Sequential calibration: block k's statistics are recorded with blocks 0..k-1 already quantized and
    swapped in. The first pass (over every layer, float model) gives the forward order, the groups and block 0's
    statistics; each later block costs one more run of `calibrate`."""
    from duquant.calibration import sequential_stages

    hessian = _wants_hessian(config)
    if first is None or not first.order or any(n not in first.stats for n in todo):
        first = run_calibration(model, todo, calibrate, max_tokens=config.calib_tokens, seed=config.seed,
                                hessian=hessian)
    calib_s, quant_s = first.seconds, 0.0
    order = [n for n in first.order if n in todo]
    stages = sequential_stages(order)
    built: dict[str, tuple[DuQuantLinear, dict]] = {}
    for k, stage in enumerate(stages):
        members = set(stage)
        groups = [[n for n in g if n in members] for g in first.groups]
        groups = [g for g in groups if g]
        if k == 0:
            calib = first
        else:
            calib = run_calibration(model, {n: todo[n] for n in stage}, calibrate, max_tokens=config.calib_tokens,
                                    seed=config.seed, hessian=hessian)
            calib_s += calib.seconds
        start = time.perf_counter()
        stage_built = _quantize_groups(groups, todo, calib, config, transforms, progress=False, timer=timer)
        quant_s += time.perf_counter() - start
        for name, (layer, _) in stage_built.items():
            layer.backend = config.backend
            _set_module(model, name, layer)  # the next block calibrates on this block's quantized outputs
        built.update(stage_built)
        if progress:
            _log(f"[duquant] sequential calibration: block {k + 1}/{len(stages)} ({len(stage)} layers)")
    return built, calib_s, quant_s


def group_transform(names: list[str], modules: dict[str, nn.Linear], stats: LayerStats | None,
                    config: DuQuantConfig, transforms: dict | None = None) -> LayerTransform:
    """The transform shared by `names`, from `transforms` (a cache: the report reuses one transform across
    bit widths and parts built from the same statistics) or built now, on the statistics' device."""
    refine = refine_settings(names, config, stats)
    key = (config.method, tuple(names), config.block_size, config.smoothing_alpha, config.rotation_steps,
           config.permute, _seed_for(config, names[0]), id(stats),
           tuple(sorted(refine.items())) if refine is not None else None)  # hashable: the cache is a dict
    if transforms is not None and key in transforms:
        return transforms[key][0]
    w_cat = torch.cat([modules[n].weight.detach().float() for n in names])
    transform = build_transform(
        config.method, weight=w_cat, act_absmax=stats.absmax if stats is not None else None,
        act_sample=stats.sample if stats is not None else None, block_size=config.block_size,
        alpha=config.smoothing_alpha, steps=config.rotation_steps, permute=config.permute,
        seed=_seed_for(config, names[0]))
    if refine is not None:
        from duquant.rotation_refine import refine_rotations

        transform = refine_rotations(transform, w_cat, stats.sample, seed=_seed_for(config, names[0]), **refine)
    if transforms is not None:
        transforms[key] = (transform, stats)  # holding `stats` keeps its id from being reused
    return transform


def refine_settings(names: list[str], config: DuQuantConfig, stats: LayerStats | None) -> dict | None:
    """The keyword arguments of ``rotation_refine.refine_rotations`` for a group (the quantizers of its first
    member's format), or None when its rotations are not refined: ``rotation_refine_steps`` 0, a method other
    than duquant, no calibration sample, or a format without integer weights and integer (or float) activations."""
    if config.rotation_refine_steps <= 0 or config.method != "duquant" or stats is None or stats.sample is None:
        return None
    fmt = config.layer_format_spec(names[0])
    if not integer_weights(fmt) or not (fmt.abits == 16 or fmt.activations.startswith("int")):
        return None
    return dict(steps=config.rotation_refine_steps, wbits=fmt.wbits, abits=fmt.abits,
                act_clip=config.activation_clip_for(fmt.abits), w_clip=config.weight_clip(fmt.wbits),
                w_symmetric=config.w_symmetric, act_symmetric=config.act_symmetric,
                learn_smooth=config.rotation_refine_smooth)


def transformed_hessian(transform: LayerTransform, stats: LayerStats | None, x_t: torch.Tensor | None
                        ) -> torch.Tensor | None:
    """E[x_t^T x_t] in the transformed basis: M^T H M from the Hessian accumulated over every calibration token
    when the calibration kept one (x_t = x M is linear in x), else from the transformed token sample."""
    if stats is not None and stats.hessian is not None and stats.tokens_seen:
        h = stats.hessian.double() / stats.tokens_seen
        return transform.apply(transform.apply(h).T.contiguous()).T.contiguous()
    if x_t is None:
        return None
    from duquant.rounding.gptq import input_hessian

    return input_hessian(x_t)


def quantize_group(names: list[str], modules: dict[str, nn.Linear], stats: LayerStats | None,
                   config: DuQuantConfig, transforms: dict | None = None, timer: PhaseTimer | None = None
                   ) -> tuple[dict[str, DuQuantLinear], dict[str, dict]]:
    """One transform for layers that share their input, then each layer's weight folded and stored in its format
    (``config.layer_format``): integer weights rounded by the configured weight rounding (duquant/rounding/),
    others by the format's own quantizer (fp8: round to nearest e4m3), on the layer's device. The members must
    agree on whether their format takes an online transform (``split_by_transform``); for weight-only formats
    (w4a16) the transform is the identity, whatever the method."""
    first = modules[names[0]]
    device = first.weight.device
    specs = {n: config.layer_format_spec(n) for n in names}
    if len({s.online_transform for s in specs.values()}) > 1:
        raise ValueError(f"layers {names} mix formats with and without an online transform; split the group first "
                         "(split_by_transform)")
    online = specs[names[0]].online_transform
    method = config.method if online else "rtn"  # rtn: the registered "no transform" method
    timer = timer or null_timer()
    sample = stats.sample if stats is not None else None
    with timer("transform_search"):
        if online:
            transform = group_transform(names, modules, stats, config, transforms)
        else:
            transform = LayerTransform(first.in_features, config.block_size, kind="identity")
    start = timer.mark()
    # On the layers' device once: apply / fold would otherwise copy the rotations there on every call, and the
    # members then share one transform object there, as they do on the CPU.
    transform = transform.to(device)
    x_t = transform.apply(sample) if sample is not None else None
    rounding = registry.rounding(config.weight_rounding)
    round_weight = registry.load(rounding.rounder)
    hessian = None
    if rounding.needs_activations and any(integer_weights(f) for f in specs.values()):
        hessian = transformed_hessian(transform, stats, x_t)

    pct_clip = None
    if config.act_pct is not None and x_t is not None:
        pct_clip = percentile_clip_ratio(x_t, config.act_pct)
    static: dict[int, tuple[float, float]] = {}  # activation bits -> static (scale, zero), shared by the group
    searched: dict[int, float] = {}  # activation bits -> the group's searched per-token clip (act_clip_search)
    if config.act_clip_search and x_t is not None:
        for abits in sorted({f.abits for f in specs.values() if f.abits != 16 and f.activations.startswith("int")}):
            members = [n for n in names if specs[n].abits == abits]
            folded = [transform.fold_into_weight(modules[n].weight.detach().float()) for n in members]
            searched[abits] = search_act_clip(x_t, folded, abits, config.act_symmetric,
                                              config.activation_clip_for(abits))

    layers, metas = {}, {}
    for name in names:
        module = modules[name]
        fmt = specs[name]
        bits = fmt.wbits
        act_clip = config.activation_clip_for(fmt.abits) if pct_clip is None or fmt.abits == 16 else pct_clip
        act_clip = searched.get(fmt.abits, act_clip)
        act_static = None
        if config.act_static and fmt.activations.startswith("int"):
            if fmt.abits not in static:
                static[fmt.abits] = static_activation_qparams(x_t, fmt.abits, config.act_symmetric, clip=act_clip)
            act_static = static[fmt.abits]
        w_t = transform.fold_into_weight(module.weight.detach().float())
        out_rot = None
        if config.row_rot != "0":
            out_rot = hadamard_block_rotation(module.out_features, config.block_out or config.block_size,
                                              generator=torch.Generator().manual_seed(_seed_for(config, name) + 1))
            w_t = rotate_rows(w_t, out_rot)
        clip: float | torch.Tensor = config.weight_clip(bits)
        if integer_weights(fmt):
            if config.clip_search:
                clip = search_weight_clip(w_t, x_t, bits, config.w_symmetric)
            extra = {}
            if rounding.act_aware:  # the sample as this layer will quantize it (None: float activations)
                extra["x_q"] = quantized_sample(x_t, fmt, config.act_symmetric, act_clip, act_static)
            qw = round_weight(w_t, bits=bits, symmetric=config.w_symmetric, clip=clip,
                              group_size=config.w_group_size, x_t=x_t, hessian=hessian, damp=config.gptq_damp,
                              act_order=config.gptq_act_order, **extra)
            weight_rounding = config.weight_rounding
        else:  # fp8: the format's own rounding (check_layer_formats refused gptq / clip search / groups)
            qw = fmt.quantize_weight(w_t, bits=bits, symmetric=config.w_symmetric, clip=clip,
                                     group_size=config.w_group_size)
            weight_rounding = "rtn"
        layer = DuQuantLinear(
            module.in_features, module.out_features, qweight=qw, transform=transform, bias=module.bias,
            abits=fmt.abits, act_symmetric=config.act_symmetric, act_clip=act_clip, act_static=act_static,
            method=method, backend=config.backend, out_rotation=out_rot, format=fmt.name)
        layer.group = list(names)
        layer.weight_rounding = weight_rounding
        layers[name] = layer.to(device)
        metas[name] = {"group": list(names), "transform_kind": transform.kind, "calibrated": stats is not None,
                       "permutation": transform.permutation,
                       "act_clip": act_clip, "act_static": list(act_static) if act_static else None,
                       "wbits": bits, "w_symmetric": qw.symmetric, "w_group_size": config.w_group_size,
                       "abits": fmt.abits, "act_symmetric": config.act_symmetric, "method": method,
                       "format": fmt.name, "weight_rounding": weight_rounding,
                       "block_size": config.block_size, "in_features": module.in_features,
                       "shape": [module.out_features, module.in_features],
                       "out_features": module.out_features}
    timer.since("rounding", start)
    return layers, metas


def quantized_sample(x_t: torch.Tensor | None, fmt: formats.Format, symmetric: bool, act_clip: float,
                     act_static: tuple[float, float] | None) -> torch.Tensor | None:
    """The transformed calibration sample quantize-dequantized as a layer of format `fmt` quantizes its inputs
    (per token with `act_clip`, or the static scale), for the act-aware roundings; None for float or non-integer
    activations, or without a sample."""
    if x_t is None or fmt.abits == 16 or not fmt.activations.startswith("int"):
        return None
    from duquant.quantizers import fake_quantize_activation, fake_quantize_activation_static

    if act_static is not None:
        return fake_quantize_activation_static(x_t.float(), act_static[0], act_static[1], fmt.abits, symmetric)
    return fake_quantize_activation(x_t.float(), fmt.abits, symmetric=symmetric, clip=act_clip)


ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def search_act_clip(x_t: torch.Tensor, weights: list[torch.Tensor], abits: int, symmetric: bool, configured: float,
                    grid: tuple[float, ...] = ACT_CLIP_GRID) -> float:
    """The per-token activation clip, of `configured` and `grid`, whose activation quantization error gives the
    smallest output error summed over the layers fed `x_t` (their transformed weights `weights`, [out, in] each):
    sum_l ||(Q_a(x_t; c) - x_t) W_l^T||^2 = sum((E_c G) * E_c) with G = sum_l W_l^T W_l. Ties keep the configured
    clip (the first candidate); a sample without finite tokens keeps it too."""
    from duquant.quantizers import fake_quantize_activation

    x = x_t.detach().reshape(-1, x_t.shape[-1]).float()
    x = x[torch.isfinite(x).all(dim=1)]
    if x.shape[0] == 0:
        return configured
    g = sum(w.double().T @ w.double() for w in weights).to(x.device)
    candidates = [configured] + [float(c) for c in grid if 0.0 < float(c) <= 1.0 and float(c) != configured]
    errs = []
    for c in candidates:
        e = (fake_quantize_activation(x, abits, symmetric=symmetric, clip=c) - x).double()
        errs.append(float(((e @ g) * e).sum()))
    return candidates[errs.index(min(errs))]


def percentile_clip_ratio(x: torch.Tensor, pct: float) -> float:
    """Per-token clip ratio equivalent to clipping at the `pct` percentile of |x| (mean over tokens), so
    percentile clipping stays a per-token dynamic quantizer an integer GEMM can run."""
    a = x.abs().float()
    q = torch.quantile(a, pct / 100.0, dim=-1)
    m = a.amax(dim=-1).clamp(min=1e-12)
    return float((q / m).clamp(0.05, 1.0).mean())


def layer_tensors(layer: DuQuantLinear) -> dict[str, torch.Tensor]:
    tensors = {"qweight": layer.qweight, "w_scale": layer.w_scale}
    if layer.w_zero is not None:
        tensors["w_zero"] = layer.w_zero
    if layer.bias is not None:
        tensors["bias"] = layer.bias
    if layer.out_rotation is not None:
        tensors["out_rotation"] = layer.out_rotation
    tensors.update(layer.transform.to_tensors("transform."))
    return tensors


def layer_from_pack(tensors: dict[str, torch.Tensor], meta: dict, module: nn.Module | None,
                    config: DuQuantConfig) -> DuQuantLinear:
    out_f, in_f = meta["out_features"], meta["in_features"]
    transform = LayerTransform.from_tensors(tensors, "transform.", in_features=in_f, block_size=meta["block_size"],
                                            kind=meta["transform_kind"], permutation=meta.get("permutation"))
    # packs written before formats were selectable hold no "format": the integer format of their bits
    fmt = formats.get(meta.get("format") or formats.name_for_bits(meta["wbits"], meta["abits"]))
    stored = SimpleNamespace(qweight=tensors["qweight"], w_scale=tensors["w_scale"], w_zero=tensors.get("w_zero"),
                             wbits=meta["wbits"], w_symmetric=meta["w_symmetric"], w_group_size=meta["w_group_size"],
                             out_features=out_f, in_features=in_f)
    qw = fmt.weight_from_buffers(stored)  # the format's weight container over the stored buffers
    act_static = tuple(meta["act_static"]) if meta.get("act_static") else None
    layer = DuQuantLinear(in_f, out_f, qweight=qw, transform=transform, bias=tensors.get("bias"),
                          abits=meta["abits"], act_symmetric=meta["act_symmetric"], act_clip=meta["act_clip"],
                          act_static=act_static, method=meta["method"], backend=config.backend,
                          out_rotation=tensors.get("out_rotation"), format=fmt.name)
    layer.group = list(meta.get("group", []))
    layer.weight_rounding = meta.get("weight_rounding", "rtn")
    if module is not None:
        layer = layer.to(module.weight.device)
    return layer


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_from_env(model: nn.Module, calibrate: Callable[[nn.Module], None] | None = None,
                   environ=None, **overrides) -> QuantReport | None:
    """The one-line hook for an existing process: quantize `model` as the OPENPI_DUQUANT_* variables say.

    Returns None (model untouched) when no OPENPI_DUQUANT_* variable other than PACKDIR is set, as the openpi
    scripts do. With DRYRUN=1 it prints the layer list and leaves the model unchanged.
    """
    if not overrides and not env_is_active(environ):
        return None
    config = DuQuantConfig.from_env(environ, **overrides)
    report = quantize(model, config, calibrate=calibrate)
    if report.dryrun:
        for line in report.lines:
            print(line)
        print(f"Matched Linear layers: {len(report.lines)}")
    return report
